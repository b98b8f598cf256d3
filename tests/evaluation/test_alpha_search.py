"""Table 2's alpha search against linear models, where the crossing is known in closed form."""

import numpy as np
import pytest
from scipy import optimize
import tensorflow as tf

from acet_tf.evaluation import alpha_search
from acet_tf.evaluation import ood_metrics

SHAPE = (3, 4, 1)  # d = 12.
THRESHOLD = 0.999
RTOL = 1e-5


def linear_predict(weights):
  """softmax(flatten(x) @ W): along alpha x the logits are alpha z, so confidence is monotone.

  Computed in float64 (returned as float32), so that the only rounding left is the search's own.
  """
  w = tf.constant(weights, tf.float64)

  def predict(images):
    flat = tf.cast(tf.reshape(images, [tf.shape(images)[0], -1]), tf.float64)
    return tf.cast(tf.nn.softmax(flat @ w), tf.float32)

  return predict


def logits64(x, weights):
  """The logits z = W^T x in float64 from the float32 inputs the model saw."""
  return np.asarray(x, np.float64).reshape(len(x), -1) @ np.asarray(weights, np.float64)


def exact_alpha(z, threshold=THRESHOLD):
  """Smallest alpha >= 1 with max softmax(alpha z) >= threshold (confidence grows with alpha)."""
  gaps = z.max() - z  # >= 0; one zero at the top class.

  def excess(alpha):
    return 1.0 / np.exp(-alpha * gaps).sum() - threshold

  if excess(1.0) >= 0:
    return 1.0
  return optimize.brentq(excess, 1.0, 1e7, xtol=1e-12, rtol=1e-14)


def ordered_weights(num_classes, rng, scale=1.0):
  """W [12, K] with class 0 on top for every x >= 0 and gaps comparable to the logits.

  Column k is scale * (K - k) * (1 + u), |u| <= 0.3 / K: then z_0 - z_1 >= 0.4 scale sum(x). Well
  separated logits keep the float32 rounding of alpha * x from moving the crossing by more than
  ~1e-6 relative (a tie-breaking gap far below the logits would amplify it).
  """
  u = rng.uniform(-0.3, 0.3, size=(12, num_classes)) / num_classes
  return (scale * (num_classes - np.arange(num_classes)) * (1 + u)).astype(np.float32)


def spread_inputs(rng, n, low, high):
  """Uniform images, each scaled by a log-uniform factor in [low, high] (spreads the alphas)."""
  factors = np.exp(rng.uniform(np.log(low), np.log(high), size=(n, 1, 1, 1)))
  return (rng.uniform(size=(n,) + SHAPE) * factors).astype(np.float32)


def test_two_classes_match_the_closed_form():
  rng = np.random.default_rng(0)
  weights = ordered_weights(2, rng)
  x = spread_inputs(rng, 40, 1e-5, 0.5)
  alphas, _ = alpha_search.make_alpha_search(linear_predict(weights))(x)
  z = logits64(x, weights)
  # K = 2: max softmax(alpha z) = sigmoid(alpha |z0 - z1|) = t  <=>  alpha = log(t/(1-t)) / |gap|.
  expected = np.maximum(np.log(THRESHOLD / (1 - THRESHOLD)) / np.abs(z[:, 0] - z[:, 1]), 1.0)
  assert expected.min() > 1.0 and expected.max() < 1e6  # The grid and bisection are exercised.
  assert expected.max() / expected.min() > 1e3
  # A float32 confidence resolves 1 - conf near 0.001 to ~6e-5 relative, alpha to ~1e-5.
  np.testing.assert_allclose(alphas.numpy(), expected, rtol=RTOL)


def test_ten_classes_match_a_root_finder_and_alpha_one_is_exact():
  rng = np.random.default_rng(1)
  weights = ordered_weights(10, rng)
  x = np.concatenate(
    [spread_inputs(rng, 20, 1e-4, 0.1), spread_inputs(rng, 4, 50.0, 60.0)]
  )  # Confident already at alpha = 1.
  alphas, _ = alpha_search.make_alpha_search(linear_predict(weights))(x)
  expected = np.array([exact_alpha(z) for z in logits64(x, weights)])
  assert (expected[:20] > 2).all() and (expected[20:] == 1).all()
  np.testing.assert_allclose(alphas.numpy(), expected, rtol=RTOL)
  np.testing.assert_array_equal(alphas.numpy()[20:], 1.0)


def test_unreached_within_alpha_max_is_inf():
  rng = np.random.default_rng(2)
  w = rng.normal(size=(12, 1)).astype(np.float32)
  # Identical rows: both logits are always equal, the confidence stays 1/2 for every alpha.
  tied = np.concatenate([w, w], axis=1)
  x = rng.uniform(size=(5,) + SHAPE).astype(np.float32)
  alphas, clipped = alpha_search.make_alpha_search(linear_predict(tied))(x)
  assert np.isinf(alphas.numpy()).all()
  np.testing.assert_allclose(clipped.numpy(), 0.5, atol=1e-6)


def test_crossings_between_the_last_power_of_two_and_alpha_max():
  # Crossings at 7e5 (between 2^19 and alpha_max = 1e6: only the capped last grid point sees it)
  # and at 1.5e6 (beyond alpha_max: unreached).
  targets = np.array([7e5, 1.5e6])
  gap = np.log(THRESHOLD / (1 - THRESHOLD)) / targets
  x = np.ones((2,) + SHAPE, np.float32)

  def predict(images):
    # Logits [0, g * mean(x)], a different g per example of this fixed batch.
    mean = tf.reduce_mean(tf.reshape(images, [2, -1]), axis=1, keepdims=True)
    return tf.nn.softmax(tf.concat([tf.zeros_like(mean), mean * gap[:, None]], axis=1))

  alphas, _ = alpha_search.make_alpha_search(predict, alpha_max=1e6)(x)
  np.testing.assert_allclose(alphas.numpy()[0], 7e5, rtol=RTOL)
  assert np.isinf(alphas.numpy()[1])


def test_table2_summary_and_clipped_share_recomputed_by_hand():
  rng = np.random.default_rng(3)
  weights = ordered_weights(3, rng, scale=0.3)  # Alphas ~3: clipping matters.
  predict = linear_predict(weights)
  seed = tf.constant([7, 8], tf.int64)
  summary, alphas, clipped = alpha_search.table2(
    predict, SHAPE, seed=seed, num_examples=50, batch_size=16
  )
  assert alphas.shape == (50,) and clipped.shape == (50,)
  # The draws are uniform noise, reproducible from the seed and batch size.
  x = np.concatenate(list(alpha_search.uniform_noise_batches(seed, SHAPE, 50, 16)))
  assert x.min() >= 0 and x.max() < 1
  np.testing.assert_allclose(alphas, [exact_alpha(z) for z in logits64(x, weights)], rtol=RTOL)
  expected = ood_metrics.alpha_summary(alphas, 1e6)
  for key in ('median', 'q25', 'q75', 'share_unreached'):
    assert summary[key] == expected[key]
  conf = predict(np.clip(alphas[:, None, None, None] * x, 0, 1)).numpy().max(axis=1)
  np.testing.assert_allclose(clipped, conf, rtol=1e-5)
  assert summary['share_overconfident_clipped'] == pytest.approx(np.mean(conf > 0.95))
  assert 0 < summary['share_overconfident_clipped'] < 1  # Not a trivial all-or-nothing case.
  again, again_alphas, _ = alpha_search.table2(
    predict, SHAPE, seed=seed, num_examples=50, batch_size=16
  )
  np.testing.assert_array_equal(again_alphas, alphas)


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(threshold=1.0),
    dict(alpha_max=0.5),
    dict(alpha_max=float('inf')),
    dict(grid_factor=1.0),
    dict(bisection_steps=-1),
  ],
)
def test_bad_search_settings(kwargs):
  with pytest.raises(ValueError):
    alpha_search.make_alpha_search(lambda x: x, **kwargs)
