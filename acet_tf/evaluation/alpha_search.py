"""Table 2 of the paper: how far out along alpha * x a model becomes overconfident (Theorem 3.1).

For uniform noise x in [0, 1]^d, the smallest alpha >= 1 with max softmax(f(alpha x)) >= 0.999,
searched per image in-graph: a geometric grid 1, g, g^2, ... (capped at alpha_max) brackets the
first grid point at or above the threshold, then bisection narrows [last grid point below, first
at or above] to float32 precision. Where the confidence is monotone in alpha (a linear model; any
ReLU network once alpha x stays in one linear region, Lemma 3.1) this is the exact crossing;
otherwise it is the first crossing the grid sees. Second row of the table: the share of the
alpha-scaled images that, clipped back to [0, 1], get confidence > 0.95 (alpha_max for draws that
never reached 0.999).
"""

import math
import time

from absl import logging
import numpy as np
import tensorflow as tf

from acet_tf.evaluation import ood_metrics
from acet_tf.ops import seed_streams

TABLE2_STREAM = seed_streams.TABLE2_STREAM  # Evaluation seed stream of the uniform draws.


def make_alpha_search(
  predict_fn, *, threshold=0.999, alpha_max=1e6, grid_factor=2.0, bisection_steps=24
):
  """Builds the compiled per-image search.

  Args:
    predict_fn: images float32 [B, H, W, C] -> probabilities float32 [B, K] (any input range).
    threshold: the confidence to reach, in (0, 1).
    alpha_max: the largest alpha tried, >= 1.
    grid_factor: ratio of consecutive grid points, > 1.
    bisection_steps: halvings of each bracket (24 reaches float32 precision for factor 2).

  Returns:
    search(x) for x float32 [B, H, W, C] -> (alphas float32 [B]: the smallest alpha found, +inf
    if none <= alpha_max; clipped_confidence float32 [B]: max softmax of clip(a x, 0, 1) with
    a = alpha, or alpha_max where unreached).
  """
  if not 0.0 < threshold < 1.0:
    raise ValueError(f'threshold must be in (0, 1), got {threshold}.')
  if not (math.isfinite(alpha_max) and alpha_max >= 1.0):
    raise ValueError(f'alpha_max must be finite and >= 1, got {alpha_max}.')
  if not grid_factor > 1.0:
    raise ValueError(f'grid_factor must be > 1, got {grid_factor}.')
  if bisection_steps < 0:
    raise ValueError(f'bisection_steps must be >= 0, got {bisection_steps}.')
  # Grid 1, g, ..., g^(n-1), alpha_max: the last point is alpha_max exactly.
  num_grid = max(1, math.ceil(math.log(alpha_max) / math.log(grid_factor) - 1e-9)) + 1

  def confidence(x, alpha):
    scaled = tf.reshape(alpha, [-1] + [1] * (len(x.shape) - 1)) * x
    return tf.reduce_max(tf.cast(predict_fn(scaled), tf.float32), axis=1)

  # Explicit while_loops: nothing for autograph to convert.
  @tf.function(reduce_retracing=True, autograph=False)
  def search(x):
    x = tf.convert_to_tensor(x, tf.float32)
    ones = tf.ones(tf.shape(x)[:1], tf.float32)
    found = confidence(x, ones) >= threshold
    lo = ones  # Largest grid point seen below the threshold.
    hi = ones  # First grid point at or above it (meaningful where found).

    def grid_step(i, found, lo, hi):
      alpha = tf.minimum(
        tf.pow(tf.constant(grid_factor, tf.float32), tf.cast(i, tf.float32)), alpha_max
      )
      reached = confidence(x, alpha * ones) >= threshold
      new = reached & ~found
      hi = tf.where(new, alpha, hi)
      lo = tf.where(~found & ~new, alpha, lo)
      return i + 1, found | new, lo, hi

    _, found, lo, hi = tf.while_loop(
      lambda i, found, lo, hi: (i < num_grid) & ~tf.reduce_all(found),
      grid_step,
      (tf.constant(1), found, lo, hi),
    )

    def bisect(t, lo, hi):
      # Draws without a bracket (found at alpha = 1, or never) keep lo = hi = 1: mid stays 1.
      mid = tf.where(found, 0.5 * (lo + hi), ones)
      reached = confidence(x, mid) >= threshold
      return t + 1, tf.where(reached, lo, mid), tf.where(reached, mid, hi)

    start = (tf.constant(0), tf.where(found, lo, ones), tf.where(found, hi, ones))
    _, lo, hi = tf.while_loop(lambda t, lo, hi: t < bisection_steps, bisect, start)
    alphas = tf.where(found, hi, tf.constant(np.inf, tf.float32))
    clipped = tf.clip_by_value(
      tf.reshape(tf.where(found, hi, alpha_max * ones), [-1] + [1] * (len(x.shape) - 1)) * x,
      0.0,
      1.0,
    )
    clipped_confidence = tf.reduce_max(tf.cast(predict_fn(clipped), tf.float32), axis=1)
    return alphas, clipped_confidence

  return search


def uniform_noise_batches(seed, image_shape, num_examples, batch_size):
  """Yields float32 [b, H, W, C] uniform in [0, 1]; batch i is a pure function of (seed, i)."""
  for i, start in enumerate(range(0, num_examples, batch_size)):
    b = min(batch_size, num_examples - start)
    yield tf.random.stateless_uniform(
      [b, *image_shape], seed=tf.random.experimental.stateless_fold_in(seed, i)
    )


def table2(
  predict_fn,
  image_shape,
  *,
  seed,
  num_examples=10_000,
  batch_size=500,
  threshold=0.999,
  alpha_max=1e6,
  clipped_threshold=0.95,
  grid_factor=2.0,
  bisection_steps=24,
):
  """The two rows of Table 2 for one model.

  Args:
    predict_fn: images float32 [B, H, W, C] -> probabilities float32 [B, K].
    image_shape: (H, W, C).
    seed: int [2] stateless seed of the uniform draws.
    num_examples: number of draws N (the paper: 10,000).
    batch_size: draws per compiled call.
    clipped_threshold: confidence above which a clipped scaled image counts as overconfident.
    threshold, alpha_max, grid_factor, bisection_steps: see make_alpha_search.

  Returns:
    (summary, alphas, clipped_confidence): summary has ood_metrics.alpha_summary's 'median', 'q25',
    'q75', 'share_unreached', plus 'share_overconfident_clipped' (share of draws whose clipped
    scaled image has confidence > clipped_threshold), 'num_examples' and the search settings;
    alphas float32 [N] (+inf if unreached); clipped_confidence float32 [N].
  """
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1, got {num_examples}.')
  search = make_alpha_search(
    predict_fn,
    threshold=threshold,
    alpha_max=alpha_max,
    grid_factor=grid_factor,
    bisection_steps=bisection_steps,
  )
  alphas, clipped = [], []
  start = time.time()
  for x in uniform_noise_batches(seed, image_shape, num_examples, batch_size):
    a, c = search(x)
    alphas.append(a.numpy())
    clipped.append(c.numpy())
    logging.info(
      'table2: %d/%d draws, %.1f s', sum(len(v) for v in alphas), num_examples, time.time() - start
    )
  alphas, clipped = np.concatenate(alphas), np.concatenate(clipped)
  summary = ood_metrics.alpha_summary(alphas, alpha_max)
  summary.update(
    share_overconfident_clipped=float(np.mean(clipped > clipped_threshold)),
    num_examples=int(num_examples),
    threshold=threshold,
    alpha_max=alpha_max,
    clipped_threshold=clipped_threshold,
    grid_factor=grid_factor,
    bisection_steps=bisection_steps,
  )
  return summary, alphas, clipped
