"""The noise distribution p_out: range, shapes, blur against scipy, permutations."""

import ml_collections
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from acet_tf.ops import noise

CONFIG = ml_collections.ConfigDict(
  dict(permuted_fraction=0.5, sigma_min=1.0, sigma_max=2.5, kernel_size=15)
)


def test_blur_matches_scipy_reflect():
  rng = np.random.RandomState(0)
  images = rng.rand(3, 28, 20, 2).astype(np.float32)
  sigmas = np.array([1.0, 1.7, 2.5], np.float32)
  got = noise.gaussian_blur(tf.constant(images), tf.constant(sigmas), 15).numpy()
  for i, sigma in enumerate(sigmas):
    # scipy's radius is int(truncate * sigma + 0.5): truncate = 7 / sigma gives the 15 taps.
    want = scipy.ndimage.gaussian_filter(
      images[i].astype(np.float64), sigma=(sigma, sigma, 0), mode='reflect', truncate=7 / sigma
    )
    np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_blur_rejects_even_kernel():
  with pytest.raises(ValueError, match='odd'):
    noise.gaussian_blur(tf.zeros([1, 28, 28, 1]), tf.ones([1]), 14)


def test_noise_range_shape_and_full_span():
  images = tf.random.stateless_uniform([8, 28, 28, 3], seed=[0, 1])
  out = noise.make_noise(images, tf.constant([1, 2], tf.int64), CONFIG).numpy()
  assert out.shape == (8, 28, 28, 3) and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out.min(axis=(1, 2, 3)), 0, atol=1e-6)
  np.testing.assert_allclose(out.max(axis=(1, 2, 3)), 1, atol=1e-6)
  # Low-pass: neighbouring pixels are far more alike than in white noise.
  assert (
    np.abs(np.diff(out, axis=1)).mean()
    < 0.5 * np.abs(np.diff(np.random.rand(*out.shape), axis=1)).mean()
  )


def test_half_the_noise_permutes_training_images():
  assert noise.is_permuted(6, 0.5).numpy().tolist() == [False, True] * 3
  assert noise.is_permuted(10, 0.0).numpy().sum() == 0
  assert noise.is_permuted(10, 1.0).numpy().sum() == 10
  images = tf.random.stateless_uniform([4, 28, 28, 3], seed=[3, 4])
  permuted = noise.permute_pixels(images, tf.constant([5, 6], tf.int64)).numpy()
  for before, after in zip(images.numpy(), permuted):
    # Same multiset of colour vectors (pixels keep their channels together), other positions.
    key = lambda a: np.sort(a.reshape(-1, 3).view([('', a.dtype)] * 3), axis=0)
    np.testing.assert_array_equal(key(before), key(after))
    assert not np.array_equal(before, after)


def test_same_seed_same_noise_other_seed_other_noise():
  images = tf.random.stateless_uniform([4, 28, 28, 1], seed=[0, 1])
  a = noise.make_noise(images, tf.constant([1, 2], tf.int64), CONFIG)
  b = noise.make_noise(images, tf.constant([1, 2], tf.int64), CONFIG)
  c = noise.make_noise(images, tf.constant([1, 3], tf.int64), CONFIG)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_noise_is_independent_of_the_replica_split():
  images = tf.random.stateless_uniform([8, 28, 28, 1], seed=[0, 1])
  seed = tf.constant([1, 2], tf.int64)
  whole = noise.make_noise(images, seed, CONFIG).numpy()
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  halves = tf.split(images, 2)
  per_replica = strategy.experimental_distribute_values_from_function(
    lambda ctx: halves[ctx.replica_id_in_sync_group]
  )
  out = strategy.run(lambda x: noise.make_noise(x, seed, CONFIG), args=(per_replica,))
  got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
  np.testing.assert_allclose(got, whole, atol=1e-6)
