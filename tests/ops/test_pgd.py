"""PGD: ball and box, objective goes up, best iterate, no gradient into the weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.ops import losses
from acet_tf.ops import pgd


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


def run_pgd(
  model, x0, steps=20, eps=0.3, step_size=0.03, objective=None, labels=None, random_start=True
):
  return pgd.pgd(
    lambda u: model(u, training=False),
    x0,
    objective or pgd.max_log_confidence_objective,
    eps=eps,
    step_size=step_size,
    steps=steps,
    seed=tf.constant([0, 1], tf.int64),
    labels=labels,
    random_start=random_start,
  )


def test_stays_in_ball_and_box():
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[1, 2])
  u, _ = run_pgd(small_model(), x0, eps=0.3, step_size=0.1)
  u, x0 = u.numpy(), x0.numpy()
  assert np.abs(u - x0).max() <= 0.3 + 1e-6
  assert u.min() >= 0 and u.max() <= 1


def test_raises_confidence_and_returns_its_objective():
  model = small_model()
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[1, 2])
  before = losses.max_log_confidence(model(x0)).numpy()
  u, best = run_pgd(model, x0)
  after = losses.max_log_confidence(model(u)).numpy()
  assert np.all(after >= before - 1e-6)
  assert after.mean() > before.mean() + 0.05
  np.testing.assert_allclose(best.numpy(), after, rtol=1e-5, atol=1e-5)


def test_best_iterate_never_worse_than_start_even_with_a_bad_step():
  # A huge step size overshoots; the best-iterate rule must still return x0 when nothing beats it.
  model = small_model()
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[3, 4])
  start = losses.max_log_confidence(model(x0)).numpy()
  u, best = run_pgd(model, x0, steps=3, step_size=5.0)
  assert np.all(best.numpy() >= start - 1e-6)


def test_cross_entropy_objective_raises_true_label_loss():
  model = small_model()
  x0 = tf.random.stateless_uniform([16, 8, 8, 1], seed=[5, 6])
  labels = tf.argmax(model(x0), axis=1, output_type=tf.int32)
  before = losses.cross_entropy(model(x0), labels).numpy()
  u, _ = run_pgd(model, x0, objective=pgd.cross_entropy_objective, labels=labels)
  assert losses.cross_entropy(model(u), labels).numpy().mean() > before.mean() + 0.1


def test_no_gradient_flows_through_the_attack_into_the_weights():
  model = small_model()
  x0 = tf.random.stateless_uniform([4, 8, 8, 1], seed=[7, 8])
  with tf.GradientTape() as tape:
    u, _ = run_pgd(model, x0, steps=3)
    # Only the path through u: d/dw of a loss on u must be None (u is a constant).
    out = tf.reduce_sum(u)
  grads = tape.gradient(out, model.trainable_variables)
  assert all(g is None for g in grads)


def test_without_random_start_zero_steps_returns_x0():
  model = small_model()
  x0 = tf.random.stateless_uniform([4, 8, 8, 1], seed=[9, 10])
  u, _ = run_pgd(model, x0, steps=0, random_start=False)
  np.testing.assert_array_equal(u.numpy(), x0.numpy())


def test_works_on_flat_inputs_inside_tf_function():
  model = keras.Sequential(
    [keras.Input((2,)), keras.layers.Dense(16, activation='relu'), keras.layers.Dense(2)]
  )
  x0 = tf.random.stateless_uniform([32, 2], seed=[1, 1])
  fn = tf.function(lambda x: run_pgd(model, x, steps=5, eps=0.1, step_size=0.05))
  u, _ = fn(x0)
  assert u.shape == (32, 2) and np.abs(u.numpy() - x0.numpy()).max() <= 0.1 + 1e-6


def _tape_gradient(logits_fn, objective, u):
  with tf.GradientTape() as tape:
    tape.watch(u)
    obj = objective(logits_fn(u), None)
  return tape.gradient(obj, u)


def test_cpu_pass_input_gradient_of_dense_layers_equals_the_tape(cpu_pass):
  # PGD's pass computes MatMul's input gradient as an einsum on CPU (pgd._matmul_grad_cpu):
  # the same values up to float32 round-off, for every transpose combination.
  rng = np.random.default_rng(0)
  u = tf.constant(rng.uniform(size=(6, 40)), tf.float32)
  w1 = tf.constant(rng.normal(size=(40, 24)), tf.float32)
  w2 = tf.constant(rng.normal(size=(10, 24)), tf.float32)
  objective = pgd.max_log_confidence_objective
  logits_fns = {
    'plain': lambda x: tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2, transpose_b=True),
    'transpose_a': lambda x: tf.matmul(tf.transpose(x), w1, transpose_a=True),
    'both': lambda x: tf.matmul(
      tf.transpose(x), tf.transpose(w1), transpose_a=True, transpose_b=True
    ),
  }
  for name, logits_fn in logits_fns.items():
    fast = pgd.objective_and_input_gradient(logits_fn, objective)
    obj, grad = fast(u, None)
    want = _tape_gradient(logits_fn, objective, u)
    np.testing.assert_allclose(obj, objective(logits_fn(u), None), rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)
  # The override is in the graph of the pass: the einsum is the formula that ran.
  fast = pgd.objective_and_input_gradient(logits_fns['plain'], objective)
  ops = {op.type for op in fast.get_concrete_function(u, None).graph.get_operations()}
  assert 'Einsum' in ops


@pytest.mark.parametrize('cpu_pass', ['tape', 'noinline+matmul'], indirect=True)
def test_keras_dense_model_pass_matches_the_tape(cpu_pass):
  model = small_model(3)
  u = tf.random.stateless_uniform([5, 8, 8, 1], seed=[2, 3])
  logits_fn = lambda x: model(x, training=False)
  objective = pgd.max_log_confidence_objective
  _, grad = pgd.objective_and_input_gradient(logits_fn, objective)(u, None)
  want = _tape_gradient(logits_fn, objective, u)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
