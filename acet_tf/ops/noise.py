"""The out-distribution p_out of the paper: low-pass filtered noise images (docs/recipe.md).

Half the images (`permuted_fraction`) permute the pixel positions of a training image, keeping
each pixel's colour vector; the rest are uniform in [0, 1]. Then a Gaussian blur with a per-image
sigma ~ U[sigma_min, sigma_max] (the reference drew one sigma per batch), a kernel_size x
kernel_size kernel normalised to 1, symmetric padding, and a per-image min-max rescale to [0, 1].
"""

import ml_collections
import tensorflow as tf

from acet_tf.ops import seed_streams


def paper_noise_config():
  """The paper's p_out settings (docs/recipe.md): what configs/common.py trains with, and what
  evaluation draws when it has no run config (an export without metadata)."""
  return ml_collections.ConfigDict(
    dict(permuted_fraction=0.5, sigma_min=1.0, sigma_max=2.5, kernel_size=15)
  )


def _reflect_band(n, kernel_size):
  """One-hot float32 [n, kernel_size, n]: tap t of output i reads input j.

  Symmetric ("reflect with edge") padding folded in: index -1 reads 0, n reads n - 1, which is
  scipy.ndimage's mode='reflect'. Valid for radius <= n.
  """
  radius = kernel_size // 2
  i = tf.range(n)[:, None]
  t = tf.range(kernel_size)[None, :]
  j = i + t - radius
  j = tf.where(j < 0, -j - 1, j)
  j = tf.where(j >= n, 2 * n - 1 - j, j)
  return tf.one_hot(j, n, dtype=tf.float32)


def gaussian_blur(images, sigmas, kernel_size):
  """Per-image separable Gaussian blur with symmetric padding.

  Args:
    images: float32 [B, H, W, C].
    sigmas: float32 [B], one standard deviation per image.
    kernel_size: odd int, taps of the 1-D kernel (15 in the paper: radius 7).

  Returns:
    float32 [B, H, W, C]. Each image is A_h @ x @ A_w^T per channel, with A the padded
    convolution written as a matrix; that vectorises over images with different sigmas.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f'kernel_size must be odd, got {kernel_size}')
  _, h, w, _ = images.shape
  radius = kernel_size // 2
  if radius > min(h, w):
    raise ValueError(f'kernel radius {radius} exceeds the image size {h}x{w}')
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernels = tf.exp(-0.5 * tf.square(offsets[None, :] / sigmas[:, None]))
  kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)
  rows = tf.einsum('bt,itj->bij', kernels, _reflect_band(h, kernel_size))
  cols = rows if w == h else tf.einsum('bt,itj->bij', kernels, _reflect_band(w, kernel_size))
  return tf.einsum('bij,bjkc,blk->bilc', rows, images, cols)


def rescale_per_image(images):
  """Maps each image's [min, max] to [0, 1] (a constant image becomes 0)."""
  lo = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
  hi = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
  return (images - lo) / tf.maximum(hi - lo, 1e-12)


def permute_pixels(images, seed):
  """Each image with its pixel positions shuffled independently; channels stay together."""
  _, h, w, c = images.shape
  b = tf.shape(images)[0]
  keys = seed_streams.uniform(seed, b, [h * w])
  order = tf.argsort(keys, axis=1)
  pixels = tf.reshape(images, [b, h * w, c])
  return tf.reshape(tf.gather(pixels, order, batch_dims=1), [b, h, w, c])


def is_permuted(local_batch, permuted_fraction):
  """bool [local_batch]: which noise images are permutations; round(fraction * N) spread evenly.

  Decided by the global index of the example, so the choice does not depend on the replica split.
  """
  offset, _ = seed_streams.batch_position(local_batch)
  index = tf.cast(offset, tf.float32) + tf.range(local_batch, dtype=tf.float32)
  return tf.floor((index + 1.0) * permuted_fraction) > tf.floor(index * permuted_fraction)


def make_noise(images, seed, noise_config):
  """Draws one noise image per input image.

  Args:
    images: float32 [B, H, W, C] in [0, 1], training images (sources of the permutations).
    seed: int [2] stateless seed.
    noise_config: has `permuted_fraction`, `sigma_min`, `sigma_max`, `kernel_size`.

  Returns:
    float32 [B, H, W, C] in [0, 1], each image spanning the full range.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  _, h, w, c = images.shape
  b = tf.shape(images)[0]
  seed_uniform, seed_permute, seed_sigma = seed_streams.split(seed, 3)
  uniform = seed_streams.uniform(seed_uniform, b, [h, w, c])
  permuted = permute_pixels(images, seed_permute)
  choose = is_permuted(b, noise_config.permuted_fraction)
  noise = tf.where(choose[:, None, None, None], permuted, uniform)
  sigmas = seed_streams.uniform(seed_sigma, b, [], noise_config.sigma_min, noise_config.sigma_max)
  return rescale_per_image(gaussian_blur(noise, sigmas, noise_config.kernel_size))
