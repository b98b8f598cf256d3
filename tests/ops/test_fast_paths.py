"""The ResNet's batch-norm-folded inference (PGD's fast path) computes the model's values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.models import resnet
from acet_tf.ops import pgd


def trained_looking_preact(shortcut, seed=0):
  """A small preact_resnet whose batch norms have non-trivial statistics and affine parameters."""
  keras.utils.set_random_seed(seed)
  model = resnet.preact_resnet(
    (16, 16, 3), 10, filters=(8, 16), units_per_stage=2, shortcut=shortcut
  )
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.5, 2.0, c),
          rng.normal(0, 0.3, c),
          rng.normal(0, 0.3, c),
          rng.uniform(0.2, 3.0, c),
        ]
      )
  return model


@pytest.mark.parametrize('shortcut', ['pad', 'conv'])
def test_folded_preact_inference_equals_the_model(shortcut):
  model = trained_looking_preact(shortcut)
  x = tf.random.stateless_uniform([6, 16, 16, 3], seed=[1, 2])
  fast = resnet.preact_inference_logits(model)
  want = model(x, training=False)
  np.testing.assert_allclose(fast(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  objective = pgd.max_log_confidence_objective
  grads = []
  for logits_fn in (fast, lambda u: model(u, training=False)):
    grads.append(
      tf.function(
        lambda u, f=logits_fn: pgd.objective_and_input_gradient(f, objective)(u, None)[1]
      )(x)
    )
  scale = np.abs(grads[1]).max()
  assert scale > 0
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-4 * scale)
  # PGD steps by the sign: nearly every pixel moves the same way.
  assert np.mean(np.sign(grads[0]) == np.sign(grads[1])) > 0.999


def test_folded_inference_follows_the_current_weights():
  model = trained_looking_preact('pad')
  fast = tf.function(resnet.preact_inference_logits(model))
  x = tf.random.stateless_uniform([2, 16, 16, 3], seed=[3, 4])
  before = fast(x).numpy()
  bn = model.get_layer('stage2_unit1_bn2')
  bn.moving_mean.assign(bn.moving_mean + 1.0)
  after = fast(x).numpy()
  assert np.abs(after - before).max() > 1e-3
  np.testing.assert_allclose(after, model(x, training=False), rtol=1e-5, atol=1e-5)


def test_inference_logits_fn_picks_the_fast_path_only_where_it_applies():
  preact = models.create_model('preact_resnet', (32, 32, 3), 10)
  lenet = models.create_model('lenet', (28, 28, 1), 10)
  x = tf.random.stateless_uniform([2, 28, 28, 1], seed=[5, 6])
  np.testing.assert_array_equal(models.inference_logits_fn(lenet)(x), lenet(x, training=False))
  graph = (
    tf.function(models.inference_logits_fn(preact))
    .get_concrete_function(tf.TensorSpec([2, 32, 32, 3]))
    .graph
  )
  ops = {op.type for op in graph.get_operations()}
  assert 'BiasAdd' in ops  # The folded batch norms (the model's own convolutions have no bias).
  with pytest.raises(ValueError, match='not a preact_resnet'):
    resnet.preact_inference_logits(lenet)
