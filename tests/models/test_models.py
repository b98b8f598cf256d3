"""Tests for acet_tf.models: shapes, exact parameter counts, batch norm modes, piecewise
affinity."""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models

_SHAPES = {'lenet': (28, 28, 1), 'preact_resnet': (32, 32, 3), 'resnet18': (32, 32, 3)}


def _images(shape, batch, seed=0):
  return np.random.RandomState(seed).uniform(0, 1, (batch,) + shape).astype(np.float32)


def _num_trainable(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def _layers(model, kind):
  return [layer for layer in model.layers if isinstance(layer, kind)]


def _moving_stats(model):
  return [
    v.numpy().copy()
    for layer in _layers(model, keras.layers.BatchNormalization)
    for v in (layer.moving_mean, layer.moving_variance)
  ]


def test_every_config_names_a_known_model_and_every_model_has_a_config():
  used = set()
  for name, arg in [
    ('mnist', 'plain'),
    ('mnist5k', 'plain'),
    ('svhn', 'plain'),
    ('cifar10', 'plain'),
    ('cifar100', 'plain'),
    ('cifar10', 'plain,model=resnet18'),
  ]:
    model = importlib.import_module(f'configs.{name}').get_config(arg).model
    assert model in models.MODEL_NAMES, (name, arg, model)
    used.add(model)
  assert used == set(models.MODEL_NAMES)


@pytest.mark.parametrize('name', ['lenet', 'preact_resnet', 'resnet18'])
def test_logits_shape_dtype_and_name(name):
  model = models.create_model(name, _SHAPES[name], 7)
  logits = model(_images(_SHAPES[name], 3), training=False)
  assert model.name == name
  assert tuple(logits.shape) == (3, 7)
  assert logits.dtype == tf.float32
  # Weight decay is the trainer's job; a regularizer here would count it twice.
  assert not model.losses


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='lenet, preact_resnet, resnet18'):
    models.create_model('resnet50', (32, 32, 3), 10)


@pytest.mark.parametrize('num_classes', [10, 26])
def test_lenet_parameter_count(num_classes):
  expected = (
    (5 * 5 * 1 * 32 + 32)
    + (5 * 5 * 32 * 64 + 64)
    + (7 * 7 * 64 * 1024 + 1024)
    + (1024 * num_classes + num_classes)
  )
  model = models.create_model('lenet', (28, 28, 1), num_classes)
  assert model.count_params() == expected  # 3,274,634 for K=10.
  assert [layer.filters for layer in _layers(model, keras.layers.Conv2D)] == [32, 64]


def test_preact_resnet_structure():
  model = models.create_model('preact_resnet', (32, 32, 3), 10)
  convs = _layers(model, keras.layers.Conv2D)
  # Stem + 3 stages x 3 units x 2 convs; the reference's shortcuts have no convolution.
  assert len(convs) == 1 + 3 * 3 * 2
  assert [c.filters for c in convs] == [16] + [16] * 6 + [32] * 6 + [64] * 6
  assert [c.strides for c in convs if c.strides != (1, 1)] == [(2, 2), (2, 2)]
  adds = _layers(model, keras.layers.Add)
  assert len(adds) == 9
  assert [tuple(adds[i].output.shape[1:]) for i in (2, 5, 8)] == [
    (32, 32, 16),
    (16, 16, 32),
    (8, 8, 64),
  ]
  # Pre-activation: 2 BNs per unit plus the final one, before the pool; all synchronized.
  bns = _layers(model, keras.layers.BatchNormalization)
  assert len(bns) == 9 * 2 + 1 and all(bn.synchronized for bn in bns)
  bn = lambda c: 2 * c  # gamma and beta.
  conv = lambda k, cin, cout: k * k * cin * cout
  stage1 = 3 * (bn(16) + conv(3, 16, 16) + bn(16) + conv(3, 16, 16))
  stage2 = (
    bn(16)
    + conv(3, 16, 32)
    + bn(32)
    + conv(3, 32, 32)
    + 2 * (bn(32) + conv(3, 32, 32) + bn(32) + conv(3, 32, 32))
  )
  stage3 = (
    bn(32)
    + conv(3, 32, 64)
    + bn(64)
    + conv(3, 64, 64)
    + 2 * (bn(64) + conv(3, 64, 64) + bn(64) + conv(3, 64, 64))
  )
  expected = conv(3, 3, 16) + stage1 + stage2 + stage3 + bn(64) + 64 * 10 + 10
  assert _num_trainable(model) == expected == 269_722


def test_preact_resnet_projection_shortcuts():
  model = models.resnet.preact_resnet((32, 32, 3), 10, shortcut='conv')
  convs = _layers(model, keras.layers.Conv2D)
  assert len(convs) == 1 + 3 * 3 * 2 + 2
  assert [c.filters for c in convs if c.kernel_size == (1, 1)] == [32, 64]
  assert _num_trainable(model) == 269_722 + 16 * 32 + 32 * 64
  assert tuple(model(_images((32, 32, 3), 2)).shape) == (2, 10)


def test_resnet18_parameter_count():
  model = models.create_model('resnet18', (32, 32, 3), 10)
  convs = _layers(model, keras.layers.Conv2D)
  assert len(convs) == 1 + 4 * 2 * 2 + 3  # Stem, 8 blocks x 2, 1x1 shortcuts of stages 2-4.
  bns = _layers(model, keras.layers.BatchNormalization)
  assert len(bns) == len(convs) and all(bn.synchronized for bn in bns)
  # The count of the usual PyTorch CIFAR ResNet-18; BN moving statistics add 2 x 4,800.
  assert _num_trainable(model) == 11_173_962
  assert model.count_params() == 11_173_962 + 2 * 4_800


@pytest.mark.parametrize('name', ['preact_resnet', 'resnet18'])
def test_batchnorm_modes_in_tf_function(name):
  model = models.create_model(name, _SHAPES[name], 10)
  x = tf.constant(_images(_SHAPES[name], 4))
  # A Python bool argument is part of the trace signature: one graph per mode.
  call = tf.function(lambda x, training: model(x, training=training))
  stats = _moving_stats(model)
  first = call(x, training=False).numpy()
  np.testing.assert_array_equal(call(x, training=False).numpy(), first)
  for before, after in zip(stats, _moving_stats(model)):
    np.testing.assert_array_equal(before, after)
  trained = call(x, training=True).numpy()
  # Batch statistics instead of the initial (0, 1) moving ones: different logits.
  assert np.abs(trained - first).max() > 1e-3
  changed = [np.abs(b - a).max() > 0 for b, a in zip(stats, _moving_stats(model))]
  assert all(changed)


def test_lenet_is_piecewise_affine():
  # In float64 a second difference along a line is ~1e-15 inside a linear region; with a smooth
  # activation (softplus) at this step it is ~1e-12.
  floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
  keras.config.set_floatx('float64')  # The input layer's dtype.
  keras.config.set_dtype_policy('float64')  # The layers' dtype.
  try:
    keras.utils.set_random_seed(0)
    model = models.create_model('lenet', (28, 28, 1), 10)
    rng = np.random.RandomState(0)
    x = rng.uniform(0, 1, (4, 28, 28, 1))
    d = rng.choice([-1.0, 1.0], x.shape)
    f = lambda t: model(x + t * d, training=False).numpy()
    h = 1e-6
    f0, fp, fm = f(0.0), f(h), f(-h)
  finally:
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)
  assert f0.dtype == np.float64
  assert np.abs(fp - fm).max() > 1e-7  # The line does move the logits.
  np.testing.assert_allclose(fp - 2 * f0 + fm, 0.0, atol=1e-13)


def test_logits_stay_float32_under_mixed_precision():
  policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy('mixed_float16')
  try:
    model = models.create_model('preact_resnet', (32, 32, 3), 10)
    logits = model(_images((32, 32, 3), 2), training=False)
  finally:
    keras.config.set_dtype_policy(policy)
  assert logits.dtype == tf.float32


def test_mirrored_batchnorm_uses_global_batch():
  # Reduction through one device, not collectives: MirroredStrategies in one process reuse the same
  # collective instance keys, so ours would clash with other test modules' (tensorflow#62790).
  strategy = tf.distribute.MirroredStrategy(
    ['/cpu:0', '/cpu:1'], cross_device_ops=tf.distribute.ReductionToOneDevice()
  )
  with strategy.scope():
    model = models.create_model('preact_resnet', (32, 32, 3), 10)
  single = models.create_model('preact_resnet', (32, 32, 3), 10)
  single.set_weights(model.get_weights())
  # The two halves differ in brightness, so per-replica statistics would differ from global ones.
  x = _images((32, 32, 3), 8)
  x[4:] *= 0.3
  halves = strategy.experimental_distribute_values_from_function(
    lambda ctx: x[4 * ctx.replica_id_in_sync_group : 4 * (ctx.replica_id_in_sync_group + 1)]
  )
  step = tf.function(lambda v: strategy.run(lambda u: model(u, training=True), args=(v,)))
  logits = np.concatenate([t.numpy() for t in strategy.experimental_local_results(step(halves))])
  np.testing.assert_allclose(logits, single(x, training=True).numpy(), atol=1e-4)
  for dist, ref in zip(_moving_stats(model), _moving_stats(single)):
    np.testing.assert_allclose(dist, ref, atol=1e-5)
  for bn in _layers(model, keras.layers.BatchNormalization):
    replicas = [v.numpy() for v in bn.moving_mean.value.values]
    np.testing.assert_array_equal(replicas[0], replicas[1])
