"""The optimised train step still computes docs/recipe.md's step: a straightforward reference
agrees.

The reference below is written to be read, not to be fast: eager TensorFlow, numpy and scipy,
one docs/recipe.md fact at a time. Only the random draws are shared with the project (the same
stateless seeds, drawn in the same order), so that "same seed" means the same noise and the same
PGD start. The project's step (train_step.make_train_function with the CPU fast paths of
acet_tf/ops/pgd.py) must give the same loss and the same weights after one step.
"""

import keras
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from acet_tf import models
from acet_tf.configs import common
from acet_tf.ops import pgd
from acet_tf.ops import seed_streams
from acet_tf.reference import authors_checkpoints
from acet_tf.training import train_step
from tests import support

BATCH = 8
LEARNING_RATE = 0.01


# ----------------------------------------------------------------------------------------------
# The reference step, docs/recipe.md read literally.
# ----------------------------------------------------------------------------------------------


def reference_noise(images, seed, noise_config):
  """docs/recipe.md "The out-distribution p_out": float64 [B, H, W, C] in [0, 1]."""
  b, h, w, c = images.shape
  seed_uniform, seed_permute, seed_sigma = seed_streams.split(seed, 3)
  uniform = tf.random.stateless_uniform([b, h, w, c], seed=seed_uniform).numpy()
  keys = tf.random.stateless_uniform([b, h * w], seed=seed_permute).numpy()
  sigmas = tf.random.stateless_uniform(
    [b], seed=seed_sigma, minval=noise_config.sigma_min, maxval=noise_config.sigma_max
  ).numpy()
  out = np.zeros([b, h, w, c])
  for i in range(b):
    # round(fraction * B) of the images, spread evenly, permute a training image's pixels.
    f = noise_config.permuted_fraction
    if np.floor((i + 1) * f) > np.floor(i * f):
      pixels = images[i].reshape(h * w, c)  # Each pixel keeps its colour vector.
      image = pixels[np.argsort(keys[i])].reshape(h, w, c)
    else:
      image = uniform[i]
    # Gaussian low-pass: 15 taps (radius 7), normalised, per channel, symmetric padding.
    radius = noise_config.kernel_size // 2
    blurred = scipy.ndimage.gaussian_filter(
      image.astype(np.float64),
      sigma=(sigmas[i], sigmas[i], 0),
      mode='reflect',
      truncate=radius / sigmas[i],
    )
    out[i] = (blurred - blurred.min()) / (blurred.max() - blurred.min())
  return out


def max_log_softmax(logits):
  """Eq. (3): max_k log softmax(f(z))_k per example."""
  return tf.reduce_max(tf.nn.log_softmax(logits), axis=-1)


def reference_pgd(model, z, seed, eps, step_size, steps, return_last=False):
  """docs/recipe.md "PGD": random start, sign steps, projection, best iterate; eager, step by step.

  return_last=True returns the last iterate instead (to check that a test can tell them apart).
  """
  seed_scale, seed_delta = seed_streams.split(seed, 2)
  s = tf.random.stateless_uniform([z.shape[0], 1, 1, 1], seed=seed_scale)
  delta = tf.random.stateless_uniform(z.shape, seed=seed_delta, minval=-eps, maxval=eps)
  lo, hi = tf.maximum(z - eps, 0.0), tf.minimum(z + eps, 1.0)
  objective = lambda u: max_log_softmax(model(u, training=False))  # Inference mode.
  best, best_obj = z, objective(z)  # The unperturbed point counts.
  u = tf.clip_by_value(z + s * delta, lo, hi)  # The random start u_0.
  for t in range(steps + 1):  # u_0 .. u_steps.
    with tf.GradientTape() as tape:
      tape.watch(u)
      obj = objective(u)
    better = obj > best_obj  # Per image, the best point seen so far.
    best = tf.where(better[:, None, None, None], u, best)
    best_obj = tf.where(better, obj, best_obj)
    if t == steps:
      break  # The last iterate is only evaluated.
    u = tf.clip_by_value(u + step_size * tf.sign(tape.gradient(obj, u)), lo, hi)
  return u if return_last else best


def reference_scopes(model):
  """{the reference's variable name: variable} (its TF 1 scopes, as its checkpoints name them)."""
  architecture = {'lenet': 'lenet', 'preact_resnet': 'resnet_small'}[model.name]
  return authors_checkpoints.reference_names(model, architecture)


def reference_step(model, config, images, labels):
  """One SGD step; returns (loss, adversarial noise or None, new weights)."""
  out = None
  if config.noise.ratio > 0:
    out = tf.constant(
      reference_noise(
        images, seed_streams.step_seed(config.seed, 0, train_step.NOISE_STREAM), config.noise
      ),
      tf.float32,
    )
    if config.pgd.steps > 0:
      out = reference_pgd(
        model,
        out,
        seed_streams.step_seed(config.seed, 0, train_step.PGD_STREAM),
        config.pgd.eps,
        config.pgd.step_size,
        config.pgd.steps,
      )
  inputs = images if out is None else tf.concat([images, out], axis=0)
  with tf.GradientTape() as tape:
    logits = model(inputs, training=True)
    loss_in = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits[: len(images)])
    loss_out = max_log_softmax(logits[len(images) :])
    # (sum CE + sum L_out) / (n_clean + n_noise) + wd * sum of squares of the variables whose
    # reference name (its TF 1 scopes) contains 'weight', 'fc' or 'conv', the reference's
    # regularizers.weight_decay: conv/dense kernels and biases, no batch-norm parameters.
    decay = config.weight_decay * sum(
      tf.reduce_sum(tf.square(v))
      for name, v in reference_scopes(model).items()
      if 'weight' in name or 'fc' in name or 'conv' in name
    )
    loss = (tf.reduce_sum(loss_in) + tf.reduce_sum(loss_out)) / len(inputs) + decay
  grads = tape.gradient(loss, model.trainable_variables)
  # SGD with momentum from zero velocity: the first step is w - lr * g.
  weights = [
    v.numpy() - LEARNING_RATE * g.numpy() for v, g in zip(model.trainable_variables, grads)
  ]
  return float(loss), out, weights


# ----------------------------------------------------------------------------------------------
# The project's step on the same model, seed and batch.
# ----------------------------------------------------------------------------------------------

INPUT_SHAPES = {'lenet': (28, 28, 1), 'preact_resnet': (32, 32, 3)}


def make_config(model, method, pgd_steps=8, step_size=0.04):
  c = common.base_config(method)
  c.model = model
  c.batch_size = BATCH
  c.seed = 7
  c.optimizer.learning_rate = LEARNING_RATE
  if method == 'acet':
    c.pgd.steps = pgd_steps  # The paper's eps 0.3; fewer, larger steps keep the test fast.
    c.pgd.step_size = step_size
  return c


def batch_of_images(shape):
  rng = np.random.RandomState(0)
  images = (rng.rand(BATCH, *shape) ** 3).astype(np.float32)  # Mostly dark, like digits.
  labels = rng.randint(0, 10, size=BATCH).astype(np.int32)
  return images, labels


def project_step(config, weights, images, labels):
  """One step of train_step.make_train_function; returns (loss, trainable weights after)."""
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    model = models.create_model(config.model, INPUT_SHAPES[config.model], 10)
    model.set_weights(weights)
    optimizer = train_step.create_optimizer(config, total_steps=100)
    optimizer.build(model.trainable_variables)
  train = train_step.make_train_function(model, optimizer, config, strategy)
  dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
  sums, bad = train(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(1))
  assert int(bad) == -1
  return float(sums['loss']), [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize(
  'model_name,method,pgd_steps,step_size',
  [
    ('lenet', 'plain', 0, 0.0),
    ('lenet', 'ceda', 0, 0.0),
    ('lenet', 'acet', 8, 0.04),
    # Steps that overshoot the ball: the best iterate is often not the last one.
    ('lenet', 'acet', 3, 0.6),
    # Batch norm: PGD must run in inference mode, the loss in training mode.
    ('preact_resnet', 'acet', 2, 0.1),
  ],
)
@pytest.mark.parametrize('cpu_pass', support.CPU_PASS_VARIANTS, indirect=True)
def test_project_step_equals_the_reference_step(model_name, method, pgd_steps, step_size, cpu_pass):
  if method != 'acet' and cpu_pass != support.ALL_CPU_PASS_FEATURES:
    pytest.skip('no PGD in this step: the pass variant does not apply')
  config = make_config(model_name, method, pgd_steps, step_size)
  images, labels = batch_of_images(INPUT_SHAPES[model_name])
  keras.utils.set_random_seed(0)
  reference_model = models.create_model(model_name, INPUT_SHAPES[model_name], 10)
  init = reference_model.get_weights()
  before = [v.numpy() for v in reference_model.trainable_variables]
  want_loss, _, want_weights = reference_step(reference_model, config, images, labels)
  got_loss, got_weights = project_step(config, init, images, labels)
  assert got_loss == pytest.approx(want_loss, rel=1e-5)
  for got, want, w0 in zip(got_weights, want_weights, before):
    # The update itself (not just the weights, which barely move) must agree. The ResNet's
    # training-mode batch norm on 16 images makes float32 gradients differ by ~0.5% of the
    # largest update between any two orders of summation (measured here: 0.54% with no PGD at
    # all, CEDA; see also tests/training/test_distributed.py), so its bound is 2% of that scale.
    scale = np.abs(want - w0).max()
    atol = 0.02 * scale if model_name == 'preact_resnet' else 1e-7
    np.testing.assert_allclose(got - w0, want - w0, rtol=1e-3, atol=atol)


@pytest.mark.parametrize('cpu_pass', support.CPU_PASS_VARIANTS, indirect=True)
@pytest.mark.parametrize('steps,step_size', [(8, 0.04), (3, 0.6)])
def test_project_attack_equals_the_reference_attack(steps, step_size, cpu_pass):
  config = make_config('lenet', 'acet', steps, step_size)
  images, _ = batch_of_images((28, 28, 1))
  keras.utils.set_random_seed(1)
  model = models.create_model('lenet', (28, 28, 1), 10)
  noise_seed = seed_streams.step_seed(config.seed, 0, train_step.NOISE_STREAM)
  got_noise = train_step.image_noise(config)(images, noise_seed)
  np.testing.assert_allclose(
    got_noise, reference_noise(images, noise_seed, config.noise), atol=1e-5
  )
  seed = seed_streams.step_seed(config.seed, 0, train_step.PGD_STREAM)
  want = reference_pgd(model, got_noise, seed, config.pgd.eps, step_size, steps)
  attack = tf.function(
    lambda x: pgd.pgd(
      lambda u: model(u, training=False),
      x,
      pgd.max_log_confidence_objective,
      eps=config.pgd.eps,
      step_size=step_size,
      steps=steps,
      seed=seed,
    )
  )
  got, _ = attack(got_noise)
  np.testing.assert_allclose(got, want, atol=1e-6)
  if step_size > 2 * config.pgd.eps:
    # The case must tell the best-iterate rule from "return the last iterate".
    last = reference_pgd(model, got_noise, seed, config.pgd.eps, step_size, steps, return_last=True)
    assert not np.allclose(want, last)


def test_cpu_input_gradient_takes_the_fast_path_and_matches_the_tape(cpu_pass):
  # One-channel 5x5 'same' convolution (the fast path), then ones the fast path must leave to
  # TensorFlow's kernels: grouped (Keras runs it in a nested XLA function on CPU), strided
  # 'valid', and multi-channel.
  keras.utils.set_random_seed(2)
  model = keras.Sequential(
    [
      keras.Input((12, 12, 1)),
      keras.layers.Conv2D(6, 5, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Conv2D(6, 3, padding='same', groups=6, activation='relu'),
      keras.layers.Conv2D(8, 3, strides=2, padding='valid', activation='relu'),
      keras.layers.Conv2D(8, 3, padding='same', activation='relu'),
      keras.layers.Flatten(),
      keras.layers.Dense(10),
    ]
  )
  x = tf.random.stateless_uniform([5, 12, 12, 1], seed=[3, 4])
  logits_fn = lambda u: model(u, training=False)
  objective = pgd.max_log_confidence_objective
  fast = tf.function(lambda u: pgd.objective_and_input_gradient(logits_fn, objective)(u, None))
  obj, grad = fast(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    want_obj = objective(logits_fn(x), None)
  want_grad = tape.gradient(want_obj, x)
  np.testing.assert_allclose(obj, want_obj, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6 * np.abs(want_grad).max())
  assert np.abs(want_grad).max() > 0
  # The fast path is really taken on this CPU (else this test would prove nothing about it).
  library = fast.get_concrete_function(x).graph.as_graph_def().library
  op_types = {node.op for f in library.function for node in f.node_def}
  assert 'DepthwiseConv2dNative' in op_types
  assert 'Conv2DBackpropInput' in op_types  # The other convolutions.
