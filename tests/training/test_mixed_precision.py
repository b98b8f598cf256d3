"""mixed_float16: loss-scale overflows are skipped, not fatal; PGD's gradient signs survive."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.ops import pgd
from acet_tf.training import train_step
from tests import support


@pytest.fixture
def float16_policy():
  policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy('mixed_float16')
  yield
  keras.config.set_dtype_policy(policy)


def float16_trainer(config, initial_scale, pool=True):
  """The tiny model of test_train_step in mixed_float16 (float32 head) with its own scale.

  pool=False: no ReLU on the convolution and no max-pooling, so that a NaN pixel reaches the
  loss: in a compiled graph oneDNN's fused convolution + ReLU and its max-pool turn NaN into a
  finite value on some CPUs (seen on an Intel Emerald Rapids; eager mode keeps the NaN).
  """
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  with strategy.scope():
    model = keras.Sequential(
      [
        keras.Input((12, 12, 1)),
        keras.layers.Conv2D(4, 3, padding='same', activation='relu' if pool else None),
        *([keras.layers.MaxPooling2D(2)] if pool else []),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation='relu'),
        keras.layers.Dense(3, dtype='float32'),
      ]
    )
    optimizer = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.SGD(config.optimizer.learning_rate), initial_scale=initial_scale
    )
    optimizer.build(model.trainable_variables)
  return (
    model,
    optimizer,
    strategy,
    train_step.make_train_function(model, optimizer, config, strategy),
  )


@pytest.mark.parametrize('method', ['plain', 'acet'])
def test_overflowing_loss_scale_skips_steps_and_training_goes_on(float16_policy, method):
  keras.utils.set_random_seed(0)
  config = support.tiny_step_config(method, batch=16)
  # 2**40 times any loss overflows float16 in the backward pass: the first steps must overflow.
  model, optimizer, strategy, train = float16_trainer(config, initial_scale=2.0**40)
  images, labels = support.toy_data(128)
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 16)))
  w0 = [w.copy() for w in model.get_weights()]
  sums, bad = train(it, tf.constant(40))
  assert int(bad) == -1  # Overflows are not errors.
  assert 20 <= float(sums['skipped']) < 40  # Skipped until the scale came down to float16's range.
  assert float(optimizer.dynamic_scale.numpy()) < 2.0**40 / 2**19
  # Every step counts (data, seeds and learning rate follow it), applied or skipped.
  assert int(optimizer.iterations.numpy()) == 40
  assert np.isfinite(float(sums['loss']))
  assert any(np.abs(w - v).max() > 0 for w, v in zip(model.get_weights(), w0))  # Some applied.
  for w in model.get_weights():
    assert np.all(np.isfinite(w))
  later, bad = train(it, tf.constant(20))
  assert int(bad) == -1 and float(later['skipped']) <= 1
  assert later['errors'] / later['count_in'] < sums['errors'] / sums['count_in'] + 0.1


def test_the_trainer_wraps_float16_in_a_loss_scale_optimizer():
  config = support.tiny_step_config('plain')
  config.mixed_precision = 'mixed_float16'
  assert isinstance(train_step.create_optimizer(config, 10), keras.optimizers.LossScaleOptimizer)
  config.mixed_precision = 'mixed_bfloat16'
  assert not isinstance(
    train_step.create_optimizer(config, 10), keras.optimizers.LossScaleOptimizer
  )


def test_a_real_non_finite_loss_still_stops_and_names_the_step(float16_policy):
  config = support.tiny_step_config('plain')
  model, _, strategy, train = float16_trainer(config, initial_scale=2.0**8, pool=False)
  images, labels = support.toy_data(32)
  images[26] = np.nan  # In the fourth batch of 8: step index 3.
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 8)))
  sums, bad = train(it, tf.constant(10))
  assert int(bad) == 3
  assert float(sums['skipped']) == 0
  del model


def confident_model(margin):
  """A small conv net whose class 0 logit is raised by `margin` (confidence ~1 - exp(-margin))."""
  model = keras.Sequential(
    [
      keras.Input((12, 12, 1)),
      keras.layers.Conv2D(8, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation='relu'),
      keras.layers.Dense(5, dtype='float32'),
    ]
  )
  kernel, bias = model.layers[-1].get_weights()
  model.layers[-1].set_weights([kernel, bias + margin * np.eye(5)[0]])
  return model


def pgd_move(model, x0, step_size=0.05):
  """PGD's step from x0: clip(x0 + step * sign(input gradient)) with ops/pgd.py's own pass."""
  grad_fn = pgd.objective_and_input_gradient(
    lambda u: model(u, training=False), pgd.max_log_confidence_objective
  )
  obj, grad = tf.function(lambda x: grad_fn(x, None))(x0)
  return obj.numpy(), np.clip(x0.numpy() + step_size * np.sign(grad.numpy()), 0.0, 1.0)


def test_float16_pgd_on_a_confident_model_moves_the_input_like_float32():
  # So confident that the objective rounds to 0 in float32 too (PGD's best-iterate rule would then
  # keep x0 in both): compare the move itself, the sign step PGD takes from the gradient.
  x0 = tf.random.stateless_uniform([16, 12, 12, 1], seed=[1, 2])
  keras.utils.set_random_seed(3)
  # The gradient at the logits (1 - p_max ~ e^-40 ~ 1e-18) is far below float16's range (6e-8)
  # and well inside float32's (1e-38).
  weights = confident_model(40.0).get_weights()
  policy = keras.config.dtype_policy()
  results = {}
  for name in ('float32', 'mixed_float16'):
    keras.config.set_dtype_policy(name)
    try:
      model = confident_model(0.0)
      model.set_weights(weights)
      results[name] = pgd_move(model, x0)
    finally:
      keras.config.set_dtype_policy(policy)
  (obj32, u32), (obj16, u16) = results['float32'], results['mixed_float16']
  assert np.all(obj32 > -1e-6) and np.all(obj16 > -1e-6)  # Confident indeed.
  moved32 = np.abs(u32 - x0.numpy()) > 1e-3
  assert moved32.mean() > 0.9  # float32 moves most pixels ...
  # ... and float16 moves the same pixels the same way (float16 round-off flips a few signs).
  same = np.isclose(u16, u32, atol=1e-6)
  assert same.mean() > 0.9, same.mean()


@pytest.mark.slow
def test_a_float16_run_with_forced_overflows_trains_to_the_end(tmp_path, monkeypatch):
  from acet_tf.configs import mnist5k
  from acet_tf.training import trainer

  config = mnist5k.get_config('acet,runlocal')
  config.strategy = 'one_device'
  config.mixed_precision = 'mixed_float16'
  # 6 steps of 1 PGD step and one evaluation, at the end, on few points: float16 runs on some
  # CPUs' slow paths (BUILD.md, 200x float32 on an Intel Emerald Rapids).
  config.num_train_steps = 6
  config.pgd.steps = 1
  config.eval.every_steps = 6
  config.eval.max_examples = 16
  config.eval.adv_noise_examples = 8
  scales = []

  def huge_scale(config, total_steps):
    # The trainer's optimizer with a scale that overflows float16 for the first ~25 steps (all 6).
    optimizer = create_optimizer(config, total_steps)
    optimizer = keras.optimizers.LossScaleOptimizer(
      optimizer.inner_optimizer, initial_scale=2.0**50
    )
    scales.append(optimizer)
    return optimizer

  create_optimizer = train_step.create_optimizer
  monkeypatch.setattr(train_step, 'create_optimizer', huge_scale)
  policy = keras.config.dtype_policy()
  try:
    final = trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    keras.config.set_dtype_policy(policy)
  assert final['step'] == 6
  assert tf.train.latest_checkpoint(str(tmp_path / 'checkpoints')).endswith('-6')
  assert float(scales[0].dynamic_scale.numpy()) <= 2.0**50 / 2**6  # Every step overflowed.
  assert int(scales[0].iterations.numpy()) == 6
  assert 0 <= final['adv_noise/mmc'] <= 1
