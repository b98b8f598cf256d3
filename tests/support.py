"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import numpy as np

from acet_tf import evaluation
from acet_tf import input_pipeline


def keras_outputs(model, images, threshold):
  """What the export should return, computed from the Keras model. images float32 in [0, 1]."""
  probs = evaluation.make_predict_fn(model)(images).numpy()
  conf = probs.max(axis=1)
  return {
    'probabilities': probs,
    'confidence': conf,
    'predicted_class': probs.argmax(axis=1).astype(np.int32),
    'accepted': conf >= threshold,
  }


def digits(n=32):
  """float32 [n, 28, 28, 1] test digits in [0, 1] (exact multiples of 1/255), labels int32 [n]."""
  images, labels = next(iter(input_pipeline.eval_dataset('mnist5k', 'test', n, max_examples=n)))
  return images.numpy(), labels.numpy()
