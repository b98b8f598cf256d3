"""A model as the evaluator's two functions: predict_fn (images -> probabilities) and logits_fn
(images -> logits for the attacks), from a Keras model or from a SavedModel export.
"""

import json
import os

import numpy as np
import tensorflow as tf

from acet_tf.artifacts import export_layout
from acet_tf.evaluation import predictions as predictions_lib


def keras_model_fns(model):
  """(predict_fn: images -> probabilities, logits_fn: images -> logits) of a Keras model."""
  return predictions_lib.make_predict_fn(model), lambda images: model(images, training=False)


def log_probabilities(predict_fn):
  """logits_fn from a predict function: softmax(log p) = p, so attacks can use it as logits.

  Probabilities that underflow to 0 are floored at the smallest normal float32 so that the
  gradient stays finite.
  """
  tiny = float(np.finfo(np.float32).tiny)
  return lambda images: tf.math.log(tf.maximum(tf.cast(predict_fn(images), tf.float32), tiny))


class SavedModelClassifier:
  """A SavedModel's `serving_default` (input `images` float32 [None, H, W, C] in [0, 1], output
  `probabilities` [None, K], optionally `logits`) as predict/logits functions.

  `path` is a version directory (holding saved_model.pb) or an export directory of integer versions
  (the newest is used). `metadata` is assets/metadata.json when the export has one, else {}.
  """

  def __init__(self, path):
    if not tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
      versions = export_layout.list_versions(path)
      if not versions:
        raise FileNotFoundError(
          f'No saved_model.pb in {path} nor in an integer version directory below it.'
        )
      path = os.path.join(path, str(versions[-1]))
    self.path = path
    self._loaded = tf.saved_model.load(path)  # Kept: the signature needs its variables alive.
    if 'serving_default' not in self._loaded.signatures:
      raise ValueError(
        f'{path} has no serving_default signature (it has {list(self._loaded.signatures)}).'
      )
    self._signature = self._loaded.signatures['serving_default']
    inputs = self._signature.structured_input_signature[1]
    if 'images' not in inputs:
      raise ValueError(f'serving_default of {path} takes {list(inputs)}, not images.')
    spec = inputs['images']
    if spec.dtype != tf.float32 or spec.shape.rank != 4 or not spec.shape[1:].is_fully_defined():
      raise ValueError(
        f'serving_default of {path} must take images float32 [None, H, W, C], got {spec}.'
      )
    self.image_shape = tuple(spec.shape[1:])
    outputs = self._signature.structured_outputs
    if 'probabilities' not in outputs:
      raise ValueError(f'serving_default of {path} returns {list(outputs)}, not probabilities.')
    self.has_logits = 'logits' in outputs
    metadata_path = os.path.join(path, 'assets', 'metadata.json')
    self.metadata = {}
    if tf.io.gfile.exists(metadata_path):
      with tf.io.gfile.GFile(metadata_path) as f:
        self.metadata = json.load(f)

  def probabilities(self, images):
    return self._signature(images=tf.convert_to_tensor(images, tf.float32))['probabilities']

  def logits(self, images):
    return self._signature(images=tf.convert_to_tensor(images, tf.float32))['logits']

  def fns(self):
    """(predict_fn, logits_fn): the export's logits if it has them, else log-probabilities."""
    return self.probabilities, (
      self.logits if self.has_logits else log_probabilities(self.probabilities)
    )


def accepts_unbounded_inputs(predict_fn, image_shape):
  """Whether predict_fn evaluates images outside [0, 1] (Table 2 scales noise by up to 1e6)."""
  try:
    predict_fn(tf.fill([1, *image_shape], 2.0))
  except tf.errors.InvalidArgumentError:
    return False
  return True
