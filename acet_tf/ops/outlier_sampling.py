"""Outlier images drawn in the train step from an in-memory bank, as the noise is drawn.

The bank (uint8 [M, H, W, C], data/outlier_data.py fills it) is sampled with replacement from a
stateless seed: each replica draws the indices of the whole global out-batch and keeps its slice
(seed_streams' rule), so the outliers of a step are the same on 1 or N replicas and after a resume.
"""

import tensorflow as tf

from acet_tf.ops import seed_streams


def sample(bank, seed, num_images):
  """float32 [num_images, H, W, C] in [0, 1]: bank rows at indices drawn from `seed`."""
  offset, total = seed_streams.batch_position(num_images)
  rows = tf.random.stateless_uniform(
    [total], seed=seed, minval=0, maxval=tf.shape(bank, out_type=tf.int64)[0], dtype=tf.int64
  )[offset : offset + num_images]
  return tf.cast(tf.gather(bank, rows), tf.float32) / 255.0


def counts(num_images, shares):
  """How many of `num_images` each share gets: largest remainders, so they sum to num_images."""
  exact = [num_images * s for s in shares]
  got = [int(e) for e in exact]
  order = sorted(range(len(shares)), key=lambda i: exact[i] - got[i], reverse=True)
  for i in order[: num_images - sum(got)]:
    got[i] += 1
  return got
