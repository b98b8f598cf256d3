"""The compiled train step shared by plain, CEDA and ACET, run under a tf.distribute strategy.

plain: cross-entropy on the clean batch. CEDA: plus the max log-confidence on as many noise
images (lambda = noise.ratio). ACET: the noise images are first moved by PGD to the most
confident point of their eps-ball. The data loss is the sum over clean and noise examples divided
by their global count (the reference), plus weight decay.
"""

import math

import keras
import tensorflow as tf

from acet_tf import models
from acet_tf.ops import losses
from acet_tf.ops import noise as noise_lib
from acet_tf.ops import pgd
from acet_tf.ops import seed_streams

# The training methods of the paper; `config.method` is one of them.
METHODS = ('plain', 'ceda', 'acet')

# Streams of the per-step stateless seed.
NOISE_STREAM, PGD_STREAM = 1, 2

# Per-replica sums returned by a step; the trainer divides by the counts.
# skipped: steps whose loss-scaled gradients overflowed (mixed_float16), left to the optimizer.
METRIC_SUMS = (
  'loss',
  'loss_in',
  'loss_out',
  'errors',
  'conf_in',
  'conf_out',
  'count_in',
  'count_out',
  'skipped',
)


def learning_rate_schedule(config, total_steps):
  """Piecewise constant: the base rate times decay_factor from step int(f * total) on, per f.

  Keras uses values[i] while step <= boundaries[i], hence the - 1.
  """
  boundaries = [int(f * total_steps) - 1 for f in config.optimizer.decay_at]
  values = [
    config.optimizer.learning_rate * config.optimizer.decay_factor**i
    for i in range(len(boundaries) + 1)
  ]
  return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def create_optimizer(config, total_steps):
  """Adam or SGD with momentum on the step schedule. Build it inside strategy.scope()."""
  schedule = learning_rate_schedule(config, total_steps)
  name = config.optimizer.name
  if name == 'adam':
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
  elif name == 'sgd':
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=config.optimizer.momentum)
  else:
    raise ValueError(f"config.optimizer.name must be 'adam' or 'sgd', got {name!r}")
  if config.mixed_precision == 'mixed_float16':
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer


def image_noise(config):
  """The paper's p_out for images: noise_fn(images, seed) -> noise of the same shape."""
  return lambda images, seed: noise_lib.make_noise(images, seed, config.noise)


def out_batch(model, config, images, step, noise_fn):
  """The out-distribution half of the batch: noise (CEDA) or adversarial noise (ACET).

  Returns float32 [N, ...] in [0, 1], N = ceil(noise.ratio * B), or None for plain.
  """
  if config.noise.ratio == 0:
    return None
  num_noise = math.ceil(config.noise.ratio * images.shape[0])
  noise = noise_fn(images[:num_noise], seed_streams.step_seed(config.seed, step, NOISE_STREAM))
  if config.pgd.steps == 0:
    return noise
  return pgd.pgd(
    logits_fn=models.inference_logits_fn(model),
    x0=noise,
    objective=pgd.max_log_confidence_objective,
    eps=config.pgd.eps,
    step_size=config.pgd.step_size,
    steps=config.pgd.steps,
    seed=seed_streams.step_seed(config.seed, step, PGD_STREAM),
    random_start=config.pgd.random_start,
  )[0]


def make_replica_step(model, optimizer, config, noise_fn=None):
  """One optimisation step on one replica's batch; returns the per-replica METRIC_SUMS.

  noise_fn(images, seed) -> noise draws the out-distribution; default the paper's image noise
  (tools/toy2d.py passes uniform noise in the 2-D box).
  """
  noise_fn = noise_fn or image_noise(config)
  loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def replica_step(images, labels):
    ctx = tf.distribute.get_replica_context()
    step = optimizer.iterations
    n_in = images.shape[0]
    out = out_batch(model, config, images, step, noise_fn)
    inputs = images if out is None else tf.concat([images, out], axis=0)
    n_out = 0 if out is None else out.shape[0]
    global_count = (n_in + n_out) * ctx.num_replicas_in_sync
    with tf.GradientTape() as tape:
      logits = tf.cast(model(inputs, training=True), tf.float32)
      loss_in = losses.cross_entropy(logits[:n_in], labels)
      loss_out = losses.max_log_confidence(logits[n_in:])
      data_loss = tf.nn.compute_average_loss(
        tf.concat([loss_in, loss_out], axis=0), global_batch_size=global_count
      )
      # Keras 3 sums gradients over replicas: scale the per-replica regulariser by 1/replicas.
      decay = tf.nn.scale_regularization_loss(
        losses.weight_decay(
          losses.decayed_variables(model, config.weight_decay_variables), config.weight_decay
        )
      )
      loss = data_loss + decay
      # Every Keras 3 optimizer has scale_loss (a no-op without loss_scale_factor); only the
      # LossScaleOptimizer's gradients come back multiplied by its dynamic scale.
      scaled = optimizer.scale_loss(loss) if loss_scaling else loss
    grads = tape.gradient(scaled, model.trainable_variables)
    # A NaN can hide from the loss (max-pool turns NaN into -FLT_MAX) yet poison the gradients:
    # check both, so the step that breaks the weights is the one reported.
    grads_finite = tf.reduce_all(
      [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    )
    finite = tf.math.is_finite(loss) & grads_finite
    overflow = tf.constant(False)
    if loss_scaling:
      # Scaled gradients that overflow are the optimizer's to handle: it skips the update and
      # halves the scale. At a scale <= 1 the gradients are non-finite by themselves: stop.
      scale = tf.convert_to_tensor(optimizer.dynamic_scale)
      overflow = tf.math.is_finite(loss) & ~grads_finite & (scale > 1.0)
      finite = finite | overflow
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    if loss_scaling:
      # Keras 3 counts only applied updates in `iterations` (Keras 2 counted skipped ones too).
      # Count every step: the step number picks the data, the seeds and the learning rate, and
      # the trainer's step count and checkpoints follow it.
      optimizer.iterations.assign_add(tf.cast(overflow, optimizer.iterations.dtype))
    probs = tf.nn.softmax(logits)
    conf = tf.reduce_max(probs, axis=-1)
    wrong = tf.not_equal(
      tf.argmax(logits[:n_in], axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32)
    )
    return dict(
      loss=loss,
      loss_in=tf.reduce_sum(loss_in),
      loss_out=tf.reduce_sum(loss_out),
      errors=tf.reduce_sum(tf.cast(wrong, tf.float32)),
      conf_in=tf.reduce_sum(conf[:n_in]),
      conf_out=tf.reduce_sum(conf[n_in:]),
      count_in=tf.constant(float(n_in)),
      count_out=tf.constant(float(n_out)),
      skipped=tf.cast(overflow, tf.float32) / ctx.num_replicas_in_sync,
      nonfinite=1.0 - tf.cast(finite, tf.float32),
    )

  if config.jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)
  return replica_step


def make_train_function(model, optimizer, config, strategy, noise_fn=None):
  """Returns train_steps(iterator, num_steps) -> (sums, bad_step), one compiled call.

  Runs up to `num_steps` steps in one tf.function call (hides per-call dispatch) and returns the
  METRIC_SUMS reduced over replicas and steps. With a LossScaleOptimizer, a step whose scaled
  gradients overflow is skipped by the optimizer (scale halved, weights unchanged) and counted in
  `skipped`, not an error. If a step's loss or (unscaled) gradients are not finite the loop stops
  there and `bad_step` holds that step's index (else -1); that step has already
  updated the weights, so the caller must not save them.
  """
  replica_step = make_replica_step(model, optimizer, config, noise_fn)

  @tf.function
  def train_steps(iterator, num_steps):
    sums = {k: tf.constant(0.0) for k in METRIC_SUMS}
    bad_step = tf.constant(-1, tf.int64)
    for _ in tf.range(num_steps):
      step = tf.identity(optimizer.iterations)
      per_replica = strategy.run(replica_step, args=next(iterator))
      reduced = {
        k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()
      }
      if reduced['nonfinite'] > 0:
        bad_step = step
        break
      sums = {k: sums[k] + reduced[k] for k in METRIC_SUMS}
    return sums, bad_step

  return train_steps
