"""Random draws that do not depend on how the global batch is split over replicas.

Each replica draws the random numbers of the whole global batch from the same stateless seed and
keeps its own slice. So noise images and PGD starts are identical on 1 or N replicas (and after a
resume), which makes the distributed update equal the single-device one. The extra draws are cheap
next to the forward and backward passes they feed.
"""

import tensorflow as tf

# Every random stream of acet_tf, one value each: a seed is step_seed(base, step, stream), training
# streams with the step (>= 0), evaluation streams with step -1. Define streams only here;
# tests/test_robust_eval.py fails on a reused value or a stream constant defined elsewhere.
TRAIN_NOISE_STREAM = 1  # train_step: the step's noise images.
TRAIN_PGD_STREAM = 2  # train_step: the random start of the step's PGD.
TEST_NOISE_STREAM = 3  # acet_tf.keras's test_step: its noise images.
TEST_PGD_STREAM = 4  # acet_tf.keras's test_step: its PGD's random start.
EVAL_NOISE_STREAM = 11  # evaluation: the noise out-set.
EVAL_ADV_NOISE_STREAM = 12  # evaluation: the attack of the paper's adversarial noise.
EVAL_ADV_SAMPLES_STREAM = 13  # evaluation: the attack of the adversarial samples.
TABLE2_STREAM = 14  # scaling: Table 2's uniform draws.
ATTACKED_STREAM = 15  # robust_eval: the attacks on attacked sets (folded with the set's name).
UNIFORM_STREAM = 16  # robust_eval: the uniform-noise centres (was 14, Table 2's draws).
STREAMS = {k: v for k, v in dict(globals()).items() if k.endswith('_STREAM')}


def batch_position(local_batch):
  """Returns (offset, global_batch) of this replica's examples within the global batch."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:  # Cross-replica context: the caller holds the whole batch.
    return 0, local_batch
  replicas = ctx.num_replicas_in_sync
  return ctx.replica_id_in_sync_group * local_batch, replicas * local_batch


def uniform(seed, local_batch, example_shape, minval=0.0, maxval=1.0):
  """float32 [local_batch, *example_shape] uniform in [minval, maxval), this replica's slice."""
  offset, total = batch_position(local_batch)
  draws = tf.random.stateless_uniform(
    [total, *example_shape], seed=seed, minval=minval, maxval=maxval
  )
  return draws[offset : offset + local_batch]


def split(seed, num):
  """`num` independent stateless seeds ([2] int tensors) from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def step_seed(base_seed, step, stream):
  """The seed of `stream` (an int naming a use, e.g. noise or PGD) at training step `step`."""
  seed = tf.stack([tf.cast(base_seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(seed, stream)
