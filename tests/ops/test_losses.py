"""Losses: max log-confidence, cross-entropy, weight decay."""

import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.ops import losses


def test_max_log_confidence_of_uniform_logits_is_minus_log_k():
  for k in (2, 10, 100):
    out = losses.max_log_confidence(tf.zeros([3, k])).numpy()
    np.testing.assert_allclose(out, -np.log(k), rtol=1e-6)


def test_max_log_confidence_approaches_zero_for_a_dominant_class():
  out = losses.max_log_confidence(tf.constant([[50.0, 0.0, 0.0]])).numpy()
  assert -1e-6 < out[0] <= 0


def test_cross_entropy_matches_hand_value():
  logits = tf.constant([[2.0, 0.0], [0.0, 0.0]])
  want = [np.log(1 + np.exp(-2.0)), np.log(2.0)]
  np.testing.assert_allclose(losses.cross_entropy(logits, [0, 1]).numpy(), want, rtol=1e-6)


def test_weight_decay_sums_squares_of_the_given_variables():
  kernel = tf.Variable(tf.fill([2, 3], 2.0))
  bias = tf.Variable(tf.fill([3], 10.0))
  assert np.isclose(losses.weight_decay([kernel, bias], 5e-4).numpy(), 5e-4 * (6 * 4.0 + 300.0))
  assert losses.weight_decay([], 5e-4).numpy() == 0


def test_decayed_variables_reference_rule_takes_conv_and_dense_biases_not_batch_norm():
  model = models.preact_resnet((8, 8, 3), 4, filters=(2, 2, 2), units_per_stage=1)
  paths = [v.path for v in losses.decayed_variables(model, 'reference')]
  assert 'logits/bias' in paths and 'logits/kernel' in paths and 'stem_conv/kernel' in paths
  assert not any('bn' in p for p in paths)
  lenet = models.lenet((28, 28, 1), 10)
  assert len(losses.decayed_variables(lenet, 'reference')) == len(lenet.trainable_variables) == 8
  assert [v.path for v in losses.decayed_variables(lenet, 'kernels')] == [
    'conv1/kernel',
    'conv2/kernel',
    'fc1/kernel',
    'logits/kernel',
  ]
  with pytest.raises(ValueError, match='weight_decay_variables must be one of'):
    losses.decayed_variables(lenet, 'all')
