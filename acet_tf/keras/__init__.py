"""acet_tf in ordinary Keras code: model.fit trains any of the trainer's methods (plain, CEDA,
ACET, OE, GOOD, ProoD) on the trainer's own step (OutlierAwareModel), and the trained classifier
goes to acet_tf's evaluation and export. May import: training, exporting, evaluation and the
layers below them; never the binaries or configs.
"""

from acet_tf.keras.handoff import evaluate
from acet_tf.keras.handoff import export
from acet_tf.keras.outlier_aware_model import METHODS
from acet_tf.keras.outlier_aware_model import OutlierAwareModel
from acet_tf.keras.outlier_aware_model import make_step_config

__all__ = ['METHODS', 'OutlierAwareModel', 'evaluate', 'export', 'make_step_config']
