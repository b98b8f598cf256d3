"""The abstaining SavedModel: the exported tf.Module, its calibration and accept rates, the
versioned export. May import: evaluation and the layers below it."""
