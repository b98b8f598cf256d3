"""The compiled train step: loss falls, distributed update equals single-device update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.training import train_step
from tests import support


def make_trainer(config, strategy, weights=None, total_steps=100):
  with strategy.scope():
    model = support.tiny_model()
    if weights is not None:
      model.set_weights(weights)
    optimizer = train_step.create_optimizer(config, total_steps)
    optimizer.build(model.trainable_variables)
  return model, optimizer, train_step.make_train_function(model, optimizer, config, strategy)


@pytest.mark.parametrize('method', ['plain', 'ceda', 'acet'])
def test_loss_falls_on_tiny_data(method):
  keras.utils.set_random_seed(0)
  config = support.tiny_step_config(method, batch=32)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = support.toy_data(256)
  _, _, train = make_trainer(config, strategy)
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 32)))
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
  config = support.tiny_step_config(method)
  images, labels = support.toy_data(24, seed=1)
  init = support.tiny_model().get_weights()
  results = []
  for strategy in (
    tf.distribute.OneDeviceStrategy('/cpu:0'),
    tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']),
  ):
    model, optimizer, train = make_trainer(config, strategy, weights=init)
    # The same global batches; MirroredStrategy gives replica r the r-th half of each.
    it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 8)))
    sums, _ = train(it, tf.constant(3))
    results.append((model.get_weights(), float(sums['loss']), int(optimizer.iterations.numpy())))
  (w1, loss1, it1), (w2, loss2, it2) = results
  assert it1 == it2 == 3
  assert abs(loss1 - loss2) < 1e-5
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, atol=1e-5)  # Only summation order differs.


def test_non_finite_loss_stops_and_names_the_step():
  config = support.tiny_step_config('plain')
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = support.toy_data(16)
  images[10] = np.nan  # In the second batch of 8: step index 1.
  _, _, train = make_trainer(config, strategy)
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 8)))
  sums, bad = train(it, tf.constant(5))
  assert int(bad) == 1
  assert np.isfinite(float(sums['loss']))


def test_learning_rate_drops_at_the_configured_fractions():
  config = support.tiny_step_config('plain')
  schedule = train_step.learning_rate_schedule(config, total_steps=100)
  got = [float(schedule(s)) for s in (0, 49, 50, 74, 75, 89, 90, 99)]
  np.testing.assert_allclose(got, [0.05, 0.05, 0.005, 0.005, 5e-4, 5e-4, 5e-5, 5e-5], rtol=1e-5)
