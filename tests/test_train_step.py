"""The compiled train step: loss falls, distributed update equals single-device update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import train_step
from configs import common


def tiny_config(method, batch=8):
  c = common.base_config(method)
  c.batch_size = batch
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.05
  if method == 'acet':
    c.pgd.steps = 3
    c.pgd.step_size = 0.1
  return c


def tiny_model():
  return keras.Sequential(
    [
      keras.Input((12, 12, 1)),
      keras.layers.Conv2D(4, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Flatten(),
      keras.layers.Dense(16, activation='relu'),
      keras.layers.Dense(3),
    ]
  )


def toy_data(n, seed=0):
  """Three classes of 12x12 images told apart by which third is bright."""
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, 3, size=n).astype(np.int32)
  images = rng.rand(n, 12, 12, 1).astype(np.float32) * 0.3
  for i, y in enumerate(labels):
    images[i, 4 * y : 4 * y + 4] += 0.7
  return images, labels


def make_trainer(config, strategy, weights=None, total_steps=100):
  with strategy.scope():
    model = tiny_model()
    if weights is not None:
      model.set_weights(weights)
    optimizer = train_step.create_optimizer(config, total_steps)
    optimizer.build(model.trainable_variables)
  return model, optimizer, train_step.make_train_function(model, optimizer, config, strategy)


def dataset(images, labels, batch):
  return (
    tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(batch, drop_remainder=True)
  )


@pytest.mark.parametrize('method', ['plain', 'ceda', 'acet'])
def test_loss_falls_on_tiny_data(method):
  keras.utils.set_random_seed(0)
  config = tiny_config(method, batch=32)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = toy_data(256)
  _, _, train = make_trainer(config, strategy)
  it = iter(strategy.experimental_distribute_dataset(dataset(images, labels, 32)))
  first, bad = train(it, tf.constant(5))
  assert int(bad) == -1
  for _ in range(4):
    last, _ = train(it, tf.constant(10))
  assert last['loss'] / 10 < first['loss'] / 5 - 0.05
  assert last['errors'] / last['count_in'] < 0.2
  if method != 'plain':
    assert float(last['count_out']) == 10 * 32


@pytest.mark.parametrize('method', ['plain', 'acet'])
def test_two_replicas_give_the_single_device_update(method):
  keras.utils.set_random_seed(1)
  config = tiny_config(method)
  images, labels = toy_data(24, seed=1)
  init = tiny_model().get_weights()
  results = []
  for strategy in (
    tf.distribute.OneDeviceStrategy('/cpu:0'),
    tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']),
  ):
    model, optimizer, train = make_trainer(config, strategy, weights=init)
    # The same global batches; MirroredStrategy gives replica r the r-th half of each.
    it = iter(strategy.experimental_distribute_dataset(dataset(images, labels, 8)))
    sums, _ = train(it, tf.constant(3))
    results.append((model.get_weights(), float(sums['loss']), int(optimizer.iterations.numpy())))
  (w1, loss1, it1), (w2, loss2, it2) = results
  assert it1 == it2 == 3
  assert abs(loss1 - loss2) < 1e-5
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, atol=1e-5)  # Only summation order differs.


def test_non_finite_loss_stops_and_names_the_step():
  config = tiny_config('plain')
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = toy_data(16)
  images[10] = np.nan  # In the second batch of 8: step index 1.
  _, _, train = make_trainer(config, strategy)
  it = iter(strategy.experimental_distribute_dataset(dataset(images, labels, 8)))
  sums, bad = train(it, tf.constant(5))
  assert int(bad) == 1
  assert np.isfinite(float(sums['loss']))


def test_learning_rate_drops_at_the_configured_fractions():
  config = tiny_config('plain')
  schedule = train_step.learning_rate_schedule(config, total_steps=100)
  got = [float(schedule(s)) for s in (0, 49, 50, 74, 75, 89, 90, 99)]
  np.testing.assert_allclose(got, [0.05, 0.05, 0.005, 0.005, 5e-4, 5e-4, 5e-5, 5e-5], rtol=1e-5)
