"""APGD: the checkpoint schedule; every iterate's rules against an independent transcription of
Algorithm 1 of Croce & Hein (2020) on a non-linear objective; step halving and the restart from the
best point on objectives where fixed-step sign ascent misses the maximum; ball and box; the
closed-form optimum of a linear objective; and the worst case over attacks.

tools/mutation_check.py checks that these tests fail with the halving, the restart or the momentum
disabled."""

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


# --------------------------------------------------------------------------------------------------
# Non-linear objectives on a box of 8 coordinates: a maximum c inside the ball, off the grid of
# x0 + k eta that fixed sign steps visit; and the same with a cosine ripple (many local maxima).
# --------------------------------------------------------------------------------------------------

EPS = 0.1
RIPPLE = 12.0


def quadratic_problem(ripple, seed=0, batch=32):
  """(x0 [B, 8], f(u) -> [B] as a tf function of the logits, numpy f(u, b) and its gradient)."""
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(0.2, 0.8, (batch, 8)).astype(np.float32)
  c = (x0 + rng.uniform(-0.9, 0.9, (batch, 8)) * EPS).astype(np.float32)
  amp = 0.3 if ripple else 0.0

  def logits_fn(u):
    d = (u - c) / EPS
    return tf.reduce_sum(-(d**2) + amp * tf.cos(RIPPLE * d), axis=1)[:, None]

  def f(u, b):
    d = (u - c[b]) / EPS
    return np.sum(-(d**2) + amp * np.cos(RIPPLE * d))

  def grad(u, b):
    d = (u - c[b]) / EPS
    return (-2.0 * d - amp * RIPPLE * np.sin(RIPPLE * d)) / EPS

  return x0, logits_fn, f, grad


def first_logit(logits, labels):
  return logits[:, 0]


def algorithm_1(f, grad, x_start, lo, hi, eps, steps):
  """Croce & Hein (2020), Algorithm 1 (L-inf), one example at a time in float64: the best point.

  f(u, b), grad(u, b): the objective of example b and its gradient. As in the paper, after a
  halving x^(k+1) := x_max, so the next momentum term is x_max - x^(k) and the next success test
  compares with f(x_max).
  """
  marks = apgd.checkpoints(steps)
  best_points = []
  for b in range(x_start.shape[0]):
    x = x_start[b].astype(np.float64)
    x_prev, f_prev, eta = x, None, 2.0 * eps
    best_x, best_f, best_g = x, -np.inf, None
    successes, last, best_f_last, reduced_last = 0, 0, -np.inf, False
    for t in range(steps):
      fx, g = f(x, b), grad(x, b)
      successes += f_prev is not None and fx > f_prev
      if fx > best_f:
        best_x, best_f, best_g = x, fx, g
      f_prev = fx
      if t in marks:
        condition_1 = successes < apgd.RHO * (t - last)
        condition_2 = not reduced_last and best_f <= best_f_last
        reduced_last = condition_1 or condition_2
        best_f_last, successes, last = best_f, 0, t
        if reduced_last:
          eta /= 2.0
          x, g, f_prev = best_x, best_g, best_f
      z = np.clip(x + eta * np.sign(g), lo[b], hi[b])
      a = 0.75 if t > 0 else 1.0
      x, x_prev = np.clip(x + a * (z - x) + (1 - a) * (x - x_prev), lo[b], hi[b]), x
    if f(x, b) > best_f:
      best_x = x
    best_points.append(best_x)
  return np.stack(best_points)


@pytest.mark.parametrize('steps', [20, 50])
def test_apgd_follows_algorithm_1_of_croce_and_hein(steps):
  """Same best point as the paper's rules, written out independently: momentum 0.75, halving at
  the checkpoints under conditions 1 and 2, restart from the best point keeping x^(k)."""
  x0, logits_fn, f, grad = quadratic_problem(ripple=True, batch=16)
  lo, hi = np.maximum(x0 - EPS, 0), np.minimum(x0 + EPS, 1)
  u, best = apgd.apgd(
    logits_fn, x0, first_logit, eps=EPS, steps=steps, seed=SEED, random_start=False
  )
  expected = algorithm_1(f, grad, x0, lo, hi, EPS, steps)
  # float32 against float64 can break a near-tie (a gradient sign or a success test) the other
  # way: allow 2 of the 16 examples to part. With any of the three rules broken all 16 do.
  same = np.abs(u.numpy() - expected).max(axis=1) < 1e-5
  assert np.sum(~same) <= 2, np.flatnonzero(~same)
  np.testing.assert_allclose(
    best.numpy()[same], [f(e, b) for b, e in enumerate(expected) if same[b]], atol=1e-4
  )


def test_step_halving_reaches_a_maximum_that_fixed_step_sign_ascent_misses():
  # f = -||(u - c) / eps||^2, max 0 at c inside the ball. Fixed steps of 2 eps (APGD's first step
  # size) bounce between the faces of the box; APGD's halvings close in on c.
  x0, logits_fn, _, _ = quadratic_problem(ripple=False)
  _, best = apgd.apgd(logits_fn, x0, first_logit, eps=EPS, steps=30, seed=SEED, random_start=False)
  _, fixed = pgd.pgd(
    logits_fn, x0, first_logit, eps=EPS, step_size=2 * EPS, steps=30, seed=SEED, random_start=False
  )
  assert np.all(fixed.numpy() < -0.3), fixed.numpy().max()
  assert np.all(best.numpy() > -0.05), best.numpy().min()


def test_restart_from_the_best_point_on_an_objective_with_many_local_maxima():
  # With a cosine ripple on the quadratic, continuing from the current iterate after a halving
  # settles in a poor local maximum (mean about -1.5 with the restart disabled, measured).
  x0, logits_fn, _, _ = quadratic_problem(ripple=True)
  _, best = apgd.apgd(logits_fn, x0, first_logit, eps=EPS, steps=50, seed=SEED, random_start=False)
  _, fixed = pgd.pgd(
    logits_fn, x0, first_logit, eps=EPS, step_size=2 * EPS, steps=50, seed=SEED, random_start=False
  )
  assert best.numpy().mean() > -0.5, best.numpy().mean()
  assert best.numpy().mean() > fixed.numpy().mean() + 1.0


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


def test_pgd_with_a_decaying_step_schedule_continues_from_the_best_point():
  # On the off-grid quadratic a fixed big step bounces; each finer segment starts from the best
  # point of the one before, so the schedule ends near the maximum (max 0).
  x0, logits_fn, _, _ = quadratic_problem(ripple=False)
  schedule = ((10, 1.0), (10, 0.25), (10, 0.05))
  decay = attack_spec.Attack('decay', 'pgd', 30, schedule=schedule, random_start=False)
  run = worst_case.make_attack_fn(logits_fn, decay, first_logit, EPS)
  best = first_logit(logits_fn(run(x0, tf.zeros([32], tf.int32), SEED)), None).numpy()
  first = attack_spec.Attack('first', 'pgd', 10, step_fraction=1.0, random_start=False)
  run_first = worst_case.make_attack_fn(logits_fn, first, first_logit, EPS)
  best_first = first_logit(logits_fn(run_first(x0, tf.zeros([32], tf.int32), SEED)), None).numpy()
  assert np.all(best >= best_first - 1e-6)  # Never below its first segment.
  assert np.all(best > -0.05) and np.all(best_first < -0.1), (best.min(), best_first.max())
  assert decay.passes == 30 + 2 * 3
  with pytest.raises(ValueError, match='sum to steps'):
    attack_spec.Attack('x', 'pgd', 29, schedule=schedule)
  with pytest.raises(ValueError, match='schedule is for PGD'):
    attack_spec.Attack('x', 'apgd', 30, schedule=schedule)


def test_targeted_apgd_finds_a_class_the_untargeted_attacks_climb_away_from():
  # Logits (1, 40 (u0 - 0.7), 0): at the centre class 0 is on top, and climbing its
  # log-probability pushes u0 down to 0.2 (confidence e / (e + 1) = 0.73). Class 1 only wins
  # above u0 = 0.725, where it reaches 0.94 at the ball's edge u0 = 0.8: only a run aimed at it
  # goes there (from the centre; a random start rarely lands past 0.725). targets > K is capped.
  x0 = tf.stack([tf.fill([8], 0.5), tf.linspace(0.3, 0.7, 8)], axis=1)
  labels = tf.zeros([8], tf.int32)

  def logits_fn(u):
    return tf.stack([tf.ones_like(u[:, 0]), 40.0 * (u[:, 0] - 0.7), tf.zeros_like(u[:, 0])], 1)

  def best_confidence(attack):
    run = worst_case.make_attack_fn(logits_fn, attack, pgd.max_log_confidence_objective, 0.3)
    u = run(x0, labels, SEED)
    assert np.all(np.abs(u.numpy() - x0.numpy()) <= 0.3 + 1e-6)
    return np.max(tf.nn.softmax(logits_fn(u)).numpy(), axis=1)

  untargeted = best_confidence(attack_spec.Attack('apgd', 'apgd', 50, random_start=False))
  top1 = best_confidence(attack_spec.Attack('t1', 'apgd', 50, random_start=False, targets=1))
  # Class 1 is the least likely at the centre (-8 < 0 < 1): the third target.
  targeted = best_confidence(attack_spec.Attack('t3', 'apgd', 50, random_start=False, targets=3))
  np.testing.assert_allclose(untargeted, np.e / (np.e + 1), atol=1e-3)
  np.testing.assert_allclose(top1, untargeted, atol=1e-3)  # The top class alone: the same climb.
  best_class1 = np.exp(4.0) / (np.exp(4.0) + np.e + 1)
  np.testing.assert_allclose(targeted, best_class1, atol=1e-3)
  capped = best_confidence(attack_spec.Attack('t9', 'apgd', 50, random_start=False, targets=9))
  np.testing.assert_array_equal(capped, targeted)
  assert attack_spec.Attack('t', 'apgd', 50, restarts=2, targets=3).passes == 2 * (3 * 51 + 1)
  with pytest.raises(ValueError, match='targets is for APGD'):
    attack_spec.Attack('x', 'pgd', 10, step_fraction=0.1, targets=2)
