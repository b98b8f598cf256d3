"""ProoD's certificate: the discriminator's IBP bound on the in-logit, and the joint model's bound
u + (1 - u) / K on its confidence, hold against sampled and attacked points of the ball, are
nearly tight for a confident classifier, and reach the evaluator's guaranteed metrics.

Each test here fails for at least one of the ProoD mutations of tools/mutation_check.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.evaluation import robust_metrics
from acet_tf.models import prood
from acet_tf.ops import pgd
from acet_tf.robustness import apgd
from acet_tf.robustness import ibp
from tests import support

SHAPE = (12, 12, 1)
K = 3
SEED = tf.constant([3, 4], tf.int64)
TOL = 1e-5


def confident_prood(seed=0, classifier_scale=30.0):
  """A ProoD model whose classifier is near one-hot (the bound is then nearly tight) and whose
  discriminator's in-logit sits around 0 on [0, 1] images (p(in) neither 0 nor 1)."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(SHAPE)
  x = keras.layers.Conv2D(4, 3, padding='same', activation='relu')(inputs)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, activation='relu')(x)
  classifier = keras.Model(inputs, keras.layers.Dense(K)(x))
  final = classifier.layers[-1]
  final.kernel.assign(final.kernel * classifier_scale)
  model = prood.ProodModel(classifier, prood.discriminator(SHAPE, (4, 8), 16))
  last = model.discriminator.layers[-1]
  x = tf.random.stateless_uniform([64, *SHAPE], seed=[1, 1])
  # Weights scaled (-exp(V + log c) = c W) so that the in-logit varies by about 2 over the images.
  g = model.in_logit(x).numpy()
  last.log_weight.assign_add(tf.fill(last.log_weight.shape, float(np.log(2.0 / np.std(g)))))
  last.bias.assign([-float(np.median(model.in_logit(x).numpy() - last.bias.numpy()[0]))])
  return model


def confidence(model, u):
  return np.max(tf.nn.softmax(model(u)).numpy(), axis=1)


def attacked_points(model, x, eps):
  """PGD and APGD maximising the joint model's log-confidence, and PGD maximising the in-logit."""
  logits_fn = lambda u: model(u, training=False)
  objective = pgd.max_log_confidence_objective
  points = []
  for steps in (5, 20):
    points.append(
      pgd.pgd(logits_fn, x, objective, eps=eps, step_size=eps / 4, steps=steps, seed=SEED)[0]
    )
    points.append(apgd.apgd(logits_fn, x, objective, eps=eps, steps=steps, seed=SEED)[0])
  in_logit = lambda u: model.discriminator(u, training=False)
  up = lambda logits, _: logits[:, 0]
  points.append(pgd.pgd(in_logit, x, up, eps=eps, step_size=eps / 4, steps=20, seed=SEED)[0])
  return points


@pytest.mark.parametrize('eps', [1e-4, 1e-3])
def test_in_logit_and_confidence_bounds_hold_against_sampled_and_attacked_points(eps):
  model = confident_prood()
  x = tf.random.stateless_uniform([16, *SHAPE], seed=[5, 6])
  g_hi = ibp.in_logit_upper_bound(model.discriminator, x, eps).numpy()
  bound = ibp.confidence_upper_bound(model, x, eps).numpy()
  np.testing.assert_allclose(ibp.make_bound_fn(model, eps)(x).numpy(), bound, rtol=1e-6)
  points = [x, *support.box_points(x, eps, 8, 11), *attacked_points(model, x, eps)]
  g = np.stack([model.in_logit(u).numpy() for u in points])
  conf = np.stack([confidence(model, u) for u in points])
  assert np.all(g <= g_hi[None] + TOL), (g.max(0) - g_hi).max()
  assert np.all(conf <= bound[None] + TOL), (conf.max(0) - bound).max()
  # Informative and nearly tight: below 1, and the attacks come close to it (the classifier is
  # near one-hot, so the joint confidence is about p(in) + (1 - p(in)) / K).
  assert np.median(bound) < 0.95 and np.all(bound < 0.999), bound
  assert np.median(bound - conf.max(0)) < (0.05 if eps < 1e-3 else 0.3), bound - conf.max(0)
  # The formula: u + (1 - u) / K with u = sigmoid(g_hi), widened by round-off only.
  u = 1.0 / (1.0 + np.exp(-g_hi.astype(np.float64)))
  np.testing.assert_allclose(bound, u + (1.0 - u) / K, rtol=1e-5)


def test_bound_is_at_least_one_over_k_and_grows_with_eps():
  model = confident_prood(1)
  x = tf.random.stateless_uniform([8, *SHAPE], seed=[7, 8])
  bounds = [ibp.confidence_upper_bound(model, x, e).numpy() for e in (0.0, 0.02, 0.1, 0.3)]
  assert np.all(bounds[0] >= 1.0 / K)
  for small, large in zip(bounds, bounds[1:]):
    assert np.all(large >= small - 1e-7)
  assert np.all(bounds[-1] > bounds[0])


def test_evaluators_guaranteed_metrics_use_the_prood_bound():
  model = confident_prood(2)
  eps = 1e-3
  in_images = tf.random.stateless_uniform([16, *SHAPE], seed=[9, 9])
  in_conf = confidence(model, in_images)
  # Out points where the discriminator says "out" far below the in points: certified AUROC 1.
  last = model.discriminator.layers[-1]
  starts = {'uniform': [(tf.zeros([16, *SHAPE]) + 0.5, tf.zeros([16], tf.int32))]}
  got = robust_metrics.evaluate_attacked_sets(
    {'adv_noise': starts},
    logits_fn=lambda u: model(u, training=False),
    predict_fn=lambda u: tf.nn.softmax(model(u)),
    in_conf=in_conf,
    attack_list=(),
    eps_of={'adv_noise': eps},
    seed=0,
    bound_model=model,
    guaranteed_metrics=True,
  )
  g = got['adv_noise']['guaranteed']['uniform']
  want = ibp.confidence_upper_bound(model, starts['uniform'][0][0], eps).numpy()
  assert g['mmc'] == pytest.approx(float(np.mean(want)), rel=1e-6)
  assert g['num_examples'] == 16 and 1.0 / K <= g['mmc'] < 1.0
  assert (
    last.bias.numpy()[0] != 0.0
  )  # The bias of confident_prood was set: the test is not trivial.
