"""The compiled train step shared by every method, run under a tf.distribute strategy.

plain: cross-entropy on the clean batch. CEDA: plus the max log-confidence on as many out images
(lambda = noise.ratio) from p_out (config.out_data: the paper's noise by default, or real outlier
images, out_distribution). ACET: the out images are first moved by PGD to the most confident
point of their eps-ball. OE (Hendrycks et al., ICLR 2019): the cross-entropy from the uniform
distribution on the out images instead. GOOD_Q (Bitterwolf et al., NeurIPS 2020): on the fraction
good.q of the out images with the smallest bound, the IBP upper bound of the max log-confidence
over their eps-ball (robustness/ibp.py), eps and the bound's weight ramped up over training; the
plain max log-confidence on the rest. ProoD (Meinke et al., NeurIPS 2022): the model is a
models.ProodModel (classifier + in-vs-out discriminator); the discriminator is trained on binary
cross-entropy towards "in" on the clean batch and towards "out" on the IBP upper bound of its
in-logit over the prood.eps-ball around each out image (eps ramped up), in float32; the classifier
on plain cross-entropy, unless it is frozen (taken from another run). The data loss is the sum
over clean and out examples divided by their global count (the reference), plus weight decay.
"""

import math

import keras
import ml_collections
import tensorflow as tf

from acet_tf import models
from acet_tf.models import prood
from acet_tf.ops import losses
from acet_tf.ops import noise as noise_lib
from acet_tf.ops import outlier_sampling
from acet_tf.ops import pgd
from acet_tf.ops import seed_streams
from acet_tf.robustness import ibp

# The training methods (the paper's three, then OE, GOOD and ProoD); `config.method` is one of them.
METHODS = ('plain', 'ceda', 'acet', 'oe', 'good', 'prood')
NOISE_SOURCE = 'noise'  # In config.out_data.sources: the paper's noise, made in the step.

# Streams of the per-step stateless seed; acet_tf.keras's test_step draws from TEST_STREAMS.
NOISE_STREAM, PGD_STREAM = seed_streams.TRAIN_NOISE_STREAM, seed_streams.TRAIN_PGD_STREAM
TEST_STREAMS = (seed_streams.TEST_NOISE_STREAM, seed_streams.TEST_PGD_STREAM)

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


def step_config(method):
  """The paper's recipe (docs/recipe.md) for what the step reads, for `method` in METHODS.

  Returns a ConfigDict with method, seed, noise (p_out and its ratio lambda), pgd (ACET's inner
  maximisation), weight_decay, weight_decay_variables and jit_compile. configs/common.py's
  base_config takes these values from here; acet_tf.keras starts from it.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.weight_decay = 5e-4  # Times the sum of squares of the decayed variables, every method.
  c.weight_decay_variables = 'reference'  # losses.WEIGHT_DECAY_RULES.
  c.noise = noise_lib.paper_noise_config()
  c.noise.ratio = 0.0 if method == 'plain' else 1.0  # lambda: noise images per clean image.
  c.pgd = ml_collections.ConfigDict()
  c.pgd.steps = 40 if method == 'acet' else 0
  c.pgd.eps = 0.3
  c.pgd.step_size = 0.0075
  c.pgd.random_start = True
  if method == 'good':
    # GOOD_Q (Bitterwolf et al., NeurIPS 2020): the IBP bound of the max log-confidence in the
    # eps-ball of the q share of the out-batch with the smallest bounds; eps and the bound's weight
    # ramp linearly from 0 at ramp_start to their values at ramp_end (fractions of training).
    c.good = ml_collections.ConfigDict()
    c.good.eps = 0.01  # The paper's SVHN and CIFAR radius; MNIST's is 0.3 (configs/mnist*.py).
    c.good.q = 0.8  # GOOD_80; q = 1.0 is GOOD_100.
    c.good.weight = 1.0
    c.good.ramp_start = 0.05
    c.good.ramp_end = 0.3
  if method == 'prood':
    # ProoD: the discriminator's out-loss is the binary cross-entropy towards "out" of the IBP
    # upper bound of its in-logit over the eps-ball (GOOD's radii), eps ramped linearly from 0 at
    # ramp_start to eps at ramp_end; `weight` (the paper's kappa) multiplies the out-loss.
    c.prood = ml_collections.ConfigDict()
    c.prood.eps = 0.01  # SVHN and CIFAR; MNIST's is 0.3 (configs/mnist*.py).
    c.prood.weight = 1.0
    c.prood.ramp_start = 0.05
    c.prood.ramp_end = 0.3
    c.prood.disc_filters = (16, 32)  # The discriminator (models.prood.discriminator).
    c.prood.disc_dense = 100
  c.jit_compile = False  # XLA for the whole step: for GPUs; slower on CPU here.
  return c


def validate_step_config(config):
  """Raises ValueError naming the key for an inconsistent setting of what the step reads."""

  def check(ok, message):
    if not ok:
      raise ValueError(f'Bad config: {message}')

  check(
    config.method in METHODS,
    f'method must be one of {METHODS}, got {config.method!r}',
  )
  ratio, pgd_steps = config.noise.ratio, config.pgd.steps
  if config.method == 'plain':
    check(
      ratio == 0 and pgd_steps == 0,
      f'method plain uses no noise and no PGD: noise.ratio={ratio}, pgd.steps={pgd_steps}',
    )
  else:
    check(0 < ratio <= 1, f'noise.ratio must be in (0, 1] for {config.method}, got {ratio}')
    if config.method == 'acet':
      check(pgd_steps > 0, f'method acet needs pgd.steps > 0, got {pgd_steps}')
    else:
      check(pgd_steps == 0, f'method {config.method} uses no PGD, got pgd.steps={pgd_steps}')
  if config.method == 'good':
    g = config.good
    check(0 < g.q <= 1, f'good.q must be in (0, 1], got {g.q}')
    check(g.eps >= 0 and g.weight >= 0, f'good.eps, good.weight must be >= 0: {g.eps}, {g.weight}')
    check(
      0 <= g.ramp_start <= g.ramp_end <= 1,
      f'need 0 <= good.ramp_start <= good.ramp_end <= 1, got {g.ramp_start}, {g.ramp_end}',
    )
  if config.method == 'prood':
    p = config.prood
    check(
      p.eps >= 0 and p.weight >= 0, f'prood.eps, prood.weight must be >= 0: {p.eps}, {p.weight}'
    )
    check(
      0 <= p.ramp_start <= p.ramp_end <= 1,
      f'need 0 <= prood.ramp_start <= prood.ramp_end <= 1, got {p.ramp_start}, {p.ramp_end}',
    )
    check(
      len(p.disc_filters) >= 1 and min(p.disc_filters) >= 1 and p.disc_dense >= 1,
      f'prood.disc_filters and prood.disc_dense must be >= 1: {p.disc_filters}, {p.disc_dense}',
    )
  n = config.noise
  check(
    0 <= n.permuted_fraction <= 1,
    f'noise.permuted_fraction must be in [0, 1], got {n.permuted_fraction}',
  )
  check(
    0 < n.sigma_min <= n.sigma_max,
    f'need 0 < noise.sigma_min <= noise.sigma_max, got {n.sigma_min}, {n.sigma_max}',
  )
  check(n.kernel_size % 2 == 1, f'noise.kernel_size must be odd, got {n.kernel_size}')
  for key in ('eps', 'step_size'):
    check(config.pgd[key] > 0, f'pgd.{key} must be > 0, got {config.pgd[key]}')
  check(
    config.weight_decay_variables in losses.WEIGHT_DECAY_RULES,
    f'weight_decay_variables must be one of {losses.WEIGHT_DECAY_RULES}, got '
    f'{config.weight_decay_variables!r}',
  )


def image_noise(config):
  """The paper's p_out for images: noise_fn(images, seed) -> noise of the same shape."""
  return lambda images, seed: noise_lib.make_noise(images, seed, config.noise)


def out_distribution(config, banks=None):
  """p_out of config.out_data as noise_fn(images, seed) -> out images, one per image.

  The share of the paper's noise is made from `images` as image_noise does; every other source
  is drawn from its bank (uint8 [M, H, W, C], data/outlier_data.py), in the order of
  config.out_data.sources, each share's count by largest remainders. With noise alone this is
  image_noise itself, so the paper's configs draw exactly what they drew before.
  """
  sources, shares = tuple(config.out_data.sources), tuple(config.out_data.shares)
  banks = banks or {}
  missing = [s for s in sources if s != NOISE_SOURCE and s not in banks]
  if missing:
    raise ValueError(f'config.out_data names {missing} but no bank of their images was given.')
  if sources == (NOISE_SOURCE,):
    return image_noise(config)

  def noise_fn(images, seed):
    parts = []
    num = images.shape[0]
    draws = zip(
      sources, outlier_sampling.counts(num, shares), seed_streams.split(seed, len(sources))
    )
    for source, count, source_seed in draws:
      if count == 0:
        continue
      if source == NOISE_SOURCE:
        parts.append(noise_lib.make_noise(images[:count], source_seed, config.noise))
      else:
        parts.append(outlier_sampling.sample(banks[source], source_seed, count))
    return tf.concat(parts, axis=0)

  return noise_fn


def ramp_fraction(block, step, total_steps):
  """float32 scalar in [0, 1]: 0 until block.ramp_start of training, linear up to 1 at
  block.ramp_end, then 1 (fractions of training, so one config serves every length)."""
  start, end = block.ramp_start * total_steps, block.ramp_end * total_steps
  t = tf.cast(step, tf.float32)
  return tf.clip_by_value((t - start) / max(end - start, 1.0), 0.0, 1.0)


def good_ramp(config, step, total_steps):
  """(eps, weight) of GOOD's bound loss at `step`: 0 until good.ramp_start of training, linear up
  to good.eps and good.weight at good.ramp_end, then constant (the paper's schedule)."""
  frac = ramp_fraction(config.good, step, total_steps)
  return frac * config.good.eps, frac * config.good.weight


def prood_eps(config, step, total_steps):
  """ProoD's radius at `step` (ramped like GOOD's; step None: prood.eps itself)."""
  if step is None:
    return tf.constant(config.prood.eps, tf.float32)
  return ramp_fraction(config.prood, step, total_steps) * config.prood.eps


def prood_losses(model, images, out, eps, training):
  """The ProoD discriminator's per-example losses and the mixture's log-probabilities.

  Args:
    model: a models.ProodModel.
    images: float32 [B, H, W, C] in-distribution; out: float32 [N, H, W, C] out images.
    eps: the radius of the out images' balls (float or float32 scalar).
    training: the sub-models' mode.

  Returns:
    (in_bce float32 [B]: -log p(in|x) on the clean batch; out_bce float32 [N]: -log(1 - u) with
    u = sigmoid of the IBP upper bound of the in-logit over the eps-ball around each out image,
    i.e. the cross-entropy towards "out" of the worst point IBP allows; classifier logits float32
    [B + N, K]; the mixture's logits float32 [B + N, K], prood.mixture_logits).
  """
  inputs = tf.concat([images, out], axis=0)
  n_in = _batch_size(images)
  logits = tf.cast(model.classifier(inputs, training=training), tf.float32)
  g = model.in_logit(inputs, training=training)
  in_bce = tf.math.softplus(-g[:n_in])
  # The bound in float32 whatever the training precision: a bound is only a bound in the
  # arithmetic it was proven in (validate_config refuses mixed precision for prood).
  g_hi = ibp.in_logit_upper_bound(model.discriminator, tf.cast(out, tf.float32), eps)
  out_bce = tf.math.softplus(g_hi)
  return in_bce, out_bce, logits, prood.mixture_logits(logits, g)


def out_loss(model, config, out, logits_out, step=None, total_steps=1):
  """Per-example out-loss float32 [N] of config.method (N = 0 for plain). step None: GOOD's ramp
  at its end (acet_tf.keras's test_step)."""
  if config.method == 'oe':
    return losses.uniform_cross_entropy(logits_out)
  clean = losses.max_log_confidence(logits_out)
  if config.method != 'good':
    return clean
  if step is None:
    eps, weight = config.good.eps, config.good.weight
  else:
    eps, weight = good_ramp(config, step, total_steps)
  # In float32 and in inference mode whatever the training precision: a bound is only a bound in
  # the arithmetic it was proven in (LeNet has no batch norm; a batch-norm model is bounded with
  # its moving statistics).
  bound = ibp.log_confidence_upper_bound(model, tf.cast(out, tf.float32), eps)
  num = out.shape[0]
  if num is None:  # acet_tf.keras: a batch size known only at run time.
    num_bound = tf.cast(tf.round(config.good.q * tf.cast(tf.shape(out)[0], tf.float32)), tf.int32)
  else:
    num_bound = int(round(config.good.q * num))
    if num_bound == 0:
      return clean
  # GOOD_Q: the bound loss on the Q share with the smallest bounds (the points it can certify
  # soonest), the plain loss on the rest; the ranking itself carries no gradient. The ramped
  # weight moves a point's loss from its clean log-confidence (0) to its bound (1).
  rank = tf.argsort(tf.argsort(tf.stop_gradient(bound)))
  take = rank < num_bound
  return tf.where(take, clean + weight * (bound - clean), clean)


def _batch_size(images):
  """The batch size: a Python int when static (the trainer's batches), else an int32 scalar."""
  return images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]


def _num_noise(ratio, n):
  if isinstance(n, int):
    return math.ceil(ratio * n)
  return tf.cast(tf.math.ceil(ratio * tf.cast(n, tf.float32)), tf.int32)


def out_batch(model, config, images, step, noise_fn, streams=(NOISE_STREAM, PGD_STREAM)):
  """The out-distribution half of the batch: noise (CEDA) or adversarial noise (ACET).

  `streams`: the (noise, PGD) seed streams at `step`; test_step of acet_tf.keras draws its own.
  Returns float32 [N, ...] in [0, 1], N = ceil(noise.ratio * B), or None for plain.
  """
  if config.noise.ratio == 0:
    return None
  noise_stream, pgd_stream = streams
  num_noise = _num_noise(config.noise.ratio, _batch_size(images))
  noise = noise_fn(images[:num_noise], seed_streams.step_seed(config.seed, step, noise_stream))
  if config.pgd.steps == 0:
    return noise
  return pgd.pgd(
    logits_fn=models.inference_logits_fn(model),
    x0=noise,
    objective=pgd.max_log_confidence_objective,
    eps=config.pgd.eps,
    step_size=config.pgd.step_size,
    steps=config.pgd.steps,
    seed=seed_streams.step_seed(config.seed, step, pgd_stream),
    random_start=config.pgd.random_start,
  )[0]


def step_loss(model, config, images, labels, out, training, step=None, total_steps=1):
  """The method's loss on the clean batch and its out-batch, on one replica.

  Args:
    model: Keras model, images -> logits [B, K] (for prood a models.ProodModel, whose output is
      the mixture's log-probabilities).
    config: reads weight_decay and weight_decay_variables (and the method's own block).
    images: float32 [B, H, W, C] in [0, 1]; labels int [B].
    out: float32 [N, H, W, C] (out_batch) or None.
    training: the model's mode (True in the train step, False in acet_tf.keras's test_step).
    step, total_steps: the training step and the run's length, for GOOD's ramp (out_loss).

  Returns:
    (loss scalar: this replica's share of the global loss, logits float32 [B + N, K],
    loss_in float32 [B], loss_out float32 [N]).
  """
  ctx = tf.distribute.get_replica_context()
  n_in = _batch_size(images)
  inputs = images if out is None else tf.concat([images, out], axis=0)
  n_total = _batch_size(inputs)
  if isinstance(n_total, int):
    global_count = n_total * ctx.num_replicas_in_sync
  else:  # A batch of unknown size (acet_tf.keras, a last partial batch): count them.
    global_count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n_total)
  if config.method == 'prood':
    in_bce, out_bce, cls_logits, logits = prood_losses(
      model, images, out, prood_eps(config, step, total_steps), training
    )
    # A frozen classifier (config.classifier_workdir) has no loss; a joint one plain CE.
    loss_in = in_bce
    if model.classifier.trainable:
      loss_in += losses.cross_entropy(cls_logits[:n_in], labels)
    loss_out = config.prood.weight * out_bce
  else:
    logits = tf.cast(model(inputs, training=training), tf.float32)
    loss_in = losses.cross_entropy(logits[:n_in], labels)
    if out is None:
      loss_out = losses.max_log_confidence(logits[n_in:])  # Empty.
    else:
      loss_out = out_loss(model, config, out, logits[n_in:], step, total_steps)
  data_loss = tf.nn.compute_average_loss(
    tf.concat([loss_in, loss_out], axis=0), global_batch_size=global_count
  )
  # Keras 3 sums gradients over replicas: scale the per-replica regulariser by 1/replicas.
  decay = tf.nn.scale_regularization_loss(
    losses.weight_decay(
      losses.decayed_variables(model, config.weight_decay_variables), config.weight_decay
    )
  )
  return data_loss + decay, logits, loss_in, loss_out


def step_sums(loss, logits, labels, loss_in, loss_out):
  """The per-replica METRIC_SUMS but `skipped` (the trainer divides by the counts)."""
  n_in = _batch_size(labels)
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
    count_in=tf.cast(n_in, tf.float32),
    count_out=tf.cast(_batch_size(loss_out), tf.float32),
  )


def make_replica_step(model, optimizer, config, noise_fn=None, total_steps=1):
  """One optimisation step on one replica's batch: the trainer's and acet_tf.keras's train_step.

  noise_fn(images, seed) -> noise draws the out-distribution; default the paper's image noise
  (tools/toy2d.py passes uniform noise in the 2-D box; the trainer out_distribution's).
  total_steps: the run's length, for GOOD's ramp.

  Returns replica_step(images, labels) -> (sums, logits): sums the per-replica METRIC_SUMS plus
  `nonfinite` (1.0 if the loss or a gradient was not finite); logits float32 [B, K] of the clean
  images (Keras' compiled metrics). The step number (seeds of noise and PGD) is
  optimizer.iterations, which the update advances.
  """
  noise_fn = noise_fn or image_noise(config)
  loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def replica_step(images, labels):
    ctx = tf.distribute.get_replica_context()
    step = optimizer.iterations
    out = out_batch(model, config, images, step, noise_fn)
    with tf.GradientTape() as tape:
      loss, logits, loss_in, loss_out = step_loss(
        model, config, images, labels, out, True, step, total_steps
      )
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
    sums = step_sums(loss, logits, labels, loss_in, loss_out)
    sums['skipped'] = tf.cast(overflow, tf.float32) / ctx.num_replicas_in_sync
    sums['nonfinite'] = 1.0 - tf.cast(finite, tf.float32)
    return sums, logits[: _batch_size(images)]

  if config.jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)
  return replica_step


def make_train_function(model, optimizer, config, strategy, noise_fn=None, total_steps=1):
  """Returns train_steps(iterator, num_steps) -> (sums, bad_step), one compiled call.

  Runs up to `num_steps` steps in one tf.function call (hides per-call dispatch) and returns the
  METRIC_SUMS reduced over replicas and steps. With a LossScaleOptimizer, a step whose scaled
  gradients overflow is skipped by the optimizer (scale halved, weights unchanged) and counted in
  `skipped`, not an error. If a step's loss or (unscaled) gradients are not finite the loop stops
  there and `bad_step` holds that step's index (else -1); that step has already
  updated the weights, so the caller must not save them.
  """
  replica_step = make_replica_step(model, optimizer, config, noise_fn, total_steps)

  @tf.function
  def train_steps(iterator, num_steps):
    sums = {k: tf.constant(0.0) for k in METRIC_SUMS}
    bad_step = tf.constant(-1, tf.int64)
    for _ in tf.range(num_steps):
      step = tf.identity(optimizer.iterations)
      per_replica, _ = strategy.run(replica_step, args=next(iterator))
      reduced = {
        k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()
      }
      if reduced['nonfinite'] > 0:
        bad_step = step
        break
      sums = {k: sums[k] + reduced[k] for k in METRIC_SUMS}
    return sums, bad_step

  return train_steps
