"""IBP: at eps = 0 the bound is the forward pass; for eps > 0 it is above every point any attack
reaches, on LeNet, the small pre-activation ResNet (pad shortcut) and a conv-shortcut ResNet."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models as models_lib
from acet_tf.models import resnet
from acet_tf.ops import pgd
from acet_tf.robustness import apgd
from acet_tf.robustness import ibp

SEED = tf.constant([3, 4], tf.int64)
TOL = 1e-5  # float32 round-off of the bound.


def randomise_batch_norm(model, seed):
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0, 0.2, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.3, 2.0, n).astype(np.float32))
      layer.gamma.assign(rng.normal(1, 0.3, n).astype(np.float32))
      layer.beta.assign(rng.normal(0, 0.2, n).astype(np.float32))
  return model


def conv_shortcut_resnet(input_shape, num_classes):
  """Conv-BN-ReLU, max-pool, a unit with a 1x1 conv shortcut and Add, GAP, dense."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Conv2D(8, 3, padding='same', use_bias=False)(inputs)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.MaxPooling2D(2)(x)
  y = keras.layers.Conv2D(12, 3, strides=2, padding='same')(x)
  y = keras.layers.BatchNormalization()(y)
  s = keras.layers.Conv2D(12, 1, strides=2, padding='same')(x)
  x = keras.layers.ReLU()(keras.layers.Add()([y, s]))
  x = keras.layers.AveragePooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, activation='relu')(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def models():
  keras.utils.set_random_seed(0)
  yield 'lenet', models_lib.create_model('lenet', (12, 12, 1), 10), (12, 12, 1)
  yield (
    'preact_resnet',
    randomise_batch_norm(
      resnet.preact_resnet((16, 16, 3), 10, filters=(4, 8, 8), units_per_stage=1), 1
    ),
    (16, 16, 3),
  )
  yield 'conv_shortcut', randomise_batch_norm(conv_shortcut_resnet((16, 16, 3), 5), 2), (16, 16, 3)


MODELS = list(models())


@pytest.mark.parametrize('name,model,shape', MODELS, ids=[m[0] for m in MODELS])
def test_bound_at_eps_zero_is_the_forward_pass(name, model, shape):
  x = tf.random.stateless_uniform([8, *shape], seed=[1, 2])
  conf = tf.reduce_max(tf.nn.softmax(model(x, training=False)), axis=1).numpy()
  np.testing.assert_allclose(
    ibp.confidence_upper_bound(model, x, 0.0).numpy(), conf, rtol=1e-5, atol=1e-6
  )
  lo, hi = ibp.logit_bounds(model, x, x)
  np.testing.assert_allclose(lo.numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(hi.numpy(), lo.numpy(), atol=1e-6)


def confidence(model, u):
  return tf.reduce_max(tf.nn.softmax(model(u, training=False)), axis=1).numpy()


@pytest.mark.parametrize('eps', [3e-5, 0.01])
@pytest.mark.parametrize('name,model,shape', MODELS, ids=[m[0] for m in MODELS])
def test_bound_is_above_every_iterate_of_every_attack(name, model, shape, eps):
  x = tf.random.stateless_uniform([8, *shape], seed=[5, 6])
  bound = ibp.confidence_upper_bound(model, x, eps).numpy()
  lo, hi = ibp.input_box(x, eps)
  logits_fn = lambda u: model(u, training=False)
  objective = pgd.max_log_confidence_objective
  reached = [confidence(model, x)]
  # Every iterate of a sign-gradient ascent with a large step (it visits the corners of the box).
  u = x
  for _ in range(15):
    with tf.GradientTape() as tape:
      tape.watch(u)
      obj = objective(logits_fn(u), None)
    u = tf.clip_by_value(u + eps / 3 * tf.sign(tape.gradient(obj, u)), lo, hi)
    reached.append(confidence(model, u))
  for steps in (1, 2, 5, 20):
    reached.append(
      confidence(
        model,
        pgd.pgd(logits_fn, x, objective, eps=eps, step_size=eps / 4, steps=steps, seed=SEED)[0],
      )
    )
    reached.append(
      confidence(model, apgd.apgd(logits_fn, x, objective, eps=eps, steps=steps, seed=SEED)[0])
    )
  for i in range(5):  # Random corners of the box.
    corner = tf.where(tf.random.stateless_uniform(x.shape, seed=[i, 9]) < 0.5, lo, hi)
    reached.append(confidence(model, corner))
  reached = np.stack(reached)
  assert np.all(reached <= bound[None] + TOL), (reached.max(axis=0), bound)
  assert np.all(bound <= 1.0 + TOL)
  if eps < 1e-4:  # Untrained nets make IBP loose; in a tiny ball it must still be informative.
    assert bound.min() < 0.99


def test_bound_grows_with_eps_and_logit_bounds_contain_the_forward_pass():
  _, model, shape = MODELS[1]
  x = tf.random.stateless_uniform([8, *shape], seed=[7, 8])
  bounds = [ibp.confidence_upper_bound(model, x, e).numpy() for e in (0.0, 0.01, 0.1)]
  assert np.all(bounds[1] >= bounds[0] - TOL) and np.all(bounds[2] >= bounds[1] - TOL)
  lo, hi = ibp.logit_bounds(model, *ibp.input_box(x, 0.1))
  z = model(x, training=False).numpy()
  assert np.all(lo.numpy() <= z + TOL) and np.all(z <= hi.numpy() + TOL)


def test_unsupported_layer_is_named():
  inputs = keras.Input((4,))
  model = keras.Model(
    inputs, keras.layers.Dense(3)(keras.layers.Dense(4, activation='tanh')(inputs))
  )
  with pytest.raises(ValueError, match='tanh'):
    ibp.confidence_upper_bound(model, tf.zeros([2, 4]), 0.1)
