"""APGD: the checkpoint schedule, ball and box, the closed-form optimum of a linear objective, and
the worst case over attacks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.ops import losses
from acet_tf.ops import pgd
from acet_tf.robustness import apgd
from acet_tf.robustness import attack_spec
from acet_tf.robustness import worst_case

SEED = tf.constant([0, 1], tf.int64)


def small_model(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential(
    [
      keras.Input((8, 8, 1)),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation='relu'),
      keras.layers.Dense(10),
    ]
  )


def test_checkpoints_follow_the_paper():
  # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (then 1.05 > 1).
  assert apgd.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert apgd.checkpoints(0) == [] and apgd.checkpoints(1) == []


def linear_problem(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(8 * 8,)).astype(np.float32)
  x0 = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
  logits_fn = lambda u: tf.stack([tf.reshape(u, [-1, 64]) @ w[:, None]], axis=1)[:, :, 0]
  objective = lambda logits, labels: logits[:, 0]
  return w, x0, logits_fn, objective


def test_apgd_reaches_the_closed_form_optimum_of_a_linear_objective_and_beats_pgd():
  eps = 0.1
  w, x0, logits_fn, objective = linear_problem()
  # max w.u over the ball and box: each coordinate at the end of its interval in w's direction.
  lo, hi = np.maximum(x0 - eps, 0), np.minimum(x0 + eps, 1)
  optimum = np.where(w.reshape(1, 8, 8, 1) > 0, hi, lo).reshape(16, 64) @ w
  u, best = apgd.apgd(logits_fn, x0, objective, eps=eps, steps=20, seed=SEED)
  _, best_pgd = pgd.pgd(logits_fn, x0, objective, eps=eps, step_size=eps / 40, steps=20, seed=SEED)
  np.testing.assert_allclose(best.numpy(), optimum, rtol=1e-5, atol=1e-4)
  assert np.all(best.numpy() >= best_pgd.numpy() - 1e-4)
  assert np.all(best_pgd.numpy() < optimum - 1e-3)  # PGD's small steps do not get there in 20.
  np.testing.assert_allclose(objective(logits_fn(u), None).numpy(), best.numpy(), rtol=1e-6)


def test_apgd_stays_in_ball_and_box_and_returns_its_objective():
  model = small_model()
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[1, 2])
  logits_fn = lambda u: model(u, training=False)
  u, best = apgd.apgd(logits_fn, x0, pgd.max_log_confidence_objective, eps=0.3, steps=30, seed=SEED)
  assert np.abs(u.numpy() - x0.numpy()).max() <= 0.3 + 1e-6
  assert u.numpy().min() >= 0 and u.numpy().max() <= 1
  np.testing.assert_allclose(
    losses.max_log_confidence(model(u)).numpy(), best.numpy(), rtol=1e-5, atol=1e-5
  )
  before = losses.max_log_confidence(model(x0)).numpy()
  assert best.numpy().mean() > before.mean() + 0.05


def test_apgd_from_the_centre_never_ends_below_it():
  model = small_model(1)
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[3, 4])
  start = losses.max_log_confidence(model(x0)).numpy()
  _, best = apgd.apgd(
    lambda u: model(u, training=False),
    x0,
    pgd.max_log_confidence_objective,
    eps=0.3,
    steps=5,
    seed=SEED,
    random_start=False,
  )
  assert np.all(best.numpy() >= start - 1e-6)


def test_worst_case_is_the_maximum_over_attacks_and_at_least_each():
  model = small_model(2)
  logits_fn = lambda u: model(u, training=False)
  predict = lambda u: tf.nn.softmax(logits_fn(u))
  x0 = tf.random.stateless_uniform([32, 8, 8, 1], seed=[5, 6])
  batches = [(x0[:16], tf.zeros([16], tf.int32)), (x0[16:], tf.zeros([16], tf.int32))]
  attack_list = [
    attack_spec.Attack('pgd', 'pgd', 10, step_fraction=0.1),
    attack_spec.Attack('apgd', 'apgd', 10, restarts=2),
  ]
  out = worst_case.attack_confidences(logits_fn, predict, batches, attack_list, eps=0.3, seed=SEED)
  conf = {k: v['confidence'] for k, v in out.items()}
  worst, which = worst_case.worst_case(conf)
  assert worst.shape == (32,)
  for v in conf.values():
    assert np.all(worst >= v)
  np.testing.assert_array_equal(worst, np.maximum(conf['pgd'], conf['apgd']))
  assert set(np.unique(which)) <= {0, 1}
  clean = np.max(predict(x0).numpy(), axis=1)
  assert np.all(worst >= clean - 1e-6)  # PGD keeps x0 as a candidate.


def test_bad_attacks_are_refused():
  with pytest.raises(ValueError, match='kind'):
    attack_spec.Attack('x', 'fgsm', 10)
  with pytest.raises(ValueError, match='step_fraction'):
    attack_spec.Attack('x', 'pgd', 10)
  with pytest.raises(ValueError, match='distinct'):
    worst_case.attack_confidences(
      None, None, [], [attack_spec.Attack('a', 'apgd', 1)] * 2, eps=0.1, seed=SEED
    )
