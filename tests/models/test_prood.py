"""The ProoD model: the mixture's log-probabilities, the classifier's argmax, negative last-layer
weights, checkpoints and .keras files, and the asymptotic guarantee on rays alpha * x."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.models import prood
from tests import support

SHAPE = (12, 12, 1)
K = 3


def test_output_is_the_log_of_the_mixture_and_keeps_the_classifiers_argmax():
  model = support.tiny_prood()
  x = tf.random.stateless_uniform([64, *SHAPE], seed=[1, 2])
  logits = model.classifier(x).numpy().astype(np.float64) * 3.0
  # In-logits from confident "in" to far "out", so p(in) spans (0, 1).
  # Far out (g = -60: p(in) = 1e-26) log p(y|x) ties in float32; the model's logits do not.
  for g in (np.linspace(-12.0, 12.0, 64), np.full(64, -60.0), np.full(64, 30.0)):
    g32 = g.astype(np.float32)
    s = np.exp(logits - logits.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    p_in = 1.0 / (1.0 + np.exp(-g))[:, None]
    want = p_in * s + (1.0 - p_in) / K
    log_p = prood.mixture_log_probs(logits.astype(np.float32), g32).numpy()
    np.testing.assert_allclose(np.exp(log_p), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(log_p).sum(1), 1.0, rtol=1e-5)
    got = prood.mixture_logits(logits.astype(np.float32), g32).numpy()
    # The pipeline takes the output as logits: softmax of it gives back p.
    np.testing.assert_allclose(tf.nn.softmax(got).numpy(), want, rtol=2e-5, atol=1e-7)
    shift = got - log_p  # A constant per row.
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1], shift.shape), atol=1e-5)
    np.testing.assert_array_equal(got.argmax(1), logits.argmax(1))
  # The model's own output: the mixture of its classifier and discriminator.
  out = model(x).numpy()
  want = prood.mixture_logits(model.classifier(x), model.in_logit(x)).numpy()
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_array_equal(out.argmax(1), model.classifier(x).numpy().argmax(1))


def test_last_layer_weights_are_negative_so_the_in_logit_stays_below_its_bias():
  model = support.tiny_prood(1)
  last = model.discriminator.layers[-1]
  assert isinstance(last, prood.NegativeDense)
  last.log_weight.assign(tf.random.normal(last.log_weight.shape, stddev=3.0))
  assert np.all(last.kernel.numpy() < 0)
  last.bias.assign([0.7])
  x = tf.random.stateless_uniform([32, *SHAPE], seed=[3, 4], minval=-50.0, maxval=50.0)
  assert np.all(model.in_logit(x).numpy() <= 0.7 + 1e-6)


def far_confidences(model, directions, alphas):
  """max softmax of model(alpha * x) [len(alphas), B]; the rays leave [0, 1]."""
  return np.stack(
    [np.max(tf.nn.softmax(model(a * directions)).numpy(), axis=1) for a in alphas]
  ).astype(np.float64)


@pytest.mark.parametrize('kind', ['uniform', 'gaussian'])
def test_confidence_goes_to_one_over_k_far_away_and_a_plain_classifier_is_overconfident(kind):
  """ProoD's asymptotic guarantee on rays alpha * x for random directions, up to alpha = 1e6,
  against the paper's Theorem 3.1 for the classifier alone."""
  model = support.tiny_prood(2)
  # A trained classifier's logits are larger: scale them so the contrast is plain.
  final = model.classifier.layers[-1]
  final.kernel.assign(final.kernel * 5.0)
  seed = [5, 6]
  if kind == 'uniform':
    x = tf.random.stateless_uniform([32, *SHAPE], seed=seed)
  else:
    x = tf.random.stateless_normal([32, *SHAPE], seed=seed)
  alphas = (1.0, 1e2, 1e4, 1e6)
  joint = far_confidences(model, x, alphas)
  alone = far_confidences(model.classifier, x, alphas)
  assert np.all(joint[-1] <= 1.0 / K + 1e-3), joint[-1]
  assert np.all(joint[-2] <= 1.0 / K + 1e-2), joint[-2]
  # The classifier alone: almost surely overconfident far away (Theorem 3.1).
  assert np.median(alone[-1]) > 0.99, alone[-1]
  # The in-probability falls along the ray.
  p_in = [tf.sigmoid(model.in_logit(a * x)).numpy() for a in alphas]
  assert np.all(p_in[-1] <= 1e-3) and np.all(p_in[-1] <= p_in[0] + 1e-6)


def test_checkpoint_and_keras_file_keep_both_sub_models(tmp_path):
  model = models.create_prood_model('lenet', (28, 28, 1), 10, filters=(4, 8), dense=8)
  x = tf.random.stateless_uniform([4, 28, 28, 1], seed=[7, 8])
  want = model(x).numpy()
  path = tf.train.Checkpoint(model=model).save(str(tmp_path / 'ckpt'))
  other = models.create_prood_model('lenet', (28, 28, 1), 10, filters=(4, 8), dense=8)
  assert not np.allclose(other(x).numpy(), want)
  tf.train.Checkpoint(model=other).restore(path).assert_existing_objects_matched()
  np.testing.assert_array_equal(other(x).numpy(), want)
  model.save(str(tmp_path / 'm.keras'))
  loaded = keras.models.load_model(str(tmp_path / 'm.keras'))
  assert isinstance(loaded, prood.ProodModel)
  np.testing.assert_array_equal(loaded(x).numpy(), want)


def test_model_for_config_builds_the_prood_model_of_a_prood_config():
  from acet_tf.configs import mnist5k

  config = mnist5k.get_config('prood')
  model = models.model_for_config(config, (28, 28, 1), 10)
  assert isinstance(model, prood.ProodModel) and model.classifier.name == 'lenet'
  convs = [layer for layer in model.discriminator.layers if isinstance(layer, keras.layers.Conv2D)]
  assert tuple(layer.filters for layer in convs) == tuple(config.prood.disc_filters)
  assert model.input_shape == (None, 28, 28, 1)
  plain = models.model_for_config(mnist5k.get_config('plain'), (28, 28, 1), 10)
  assert not isinstance(plain, prood.ProodModel)


def test_weight_decay_takes_both_sub_models_but_not_the_negative_layer():
  from acet_tf.ops import losses

  model = support.tiny_prood(3)
  last = model.discriminator.layers[-1]
  negative = {id(v) for v in last.trainable_weights}
  for rule in ('reference', 'kernels'):
    chosen = losses.decayed_variables(model, rule)
    ids = {id(v) for v in chosen}
    assert not ids & negative, rule
    assert ids & {id(v) for v in model.classifier.trainable_variables}, rule
    assert ids & {id(v) for v in model.discriminator.trainable_variables}, rule
  # 'reference': every conv and dense variable of both (3 layers each), kernels and biases.
  assert len(losses.decayed_variables(model, 'reference')) == 6 + 6
