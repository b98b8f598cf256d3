"""OE and GOOD in the shared train step, and p_out from real outlier images (config.out_data)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.ops import losses
from acet_tf.ops import noise as noise_lib
from acet_tf.ops import outlier_sampling
from acet_tf.ops import seed_streams
from acet_tf.robustness import ibp
from acet_tf.training import train_step
from acet_tf.training import trainer
from tests import support

SEED = tf.constant([4, 2], tf.int64)


def test_uniform_cross_entropy_is_oe_loss():
  logits = tf.constant([[0.0, 0.0, 0.0], [3.0, -1.0, 0.5]])
  got = losses.uniform_cross_entropy(logits).numpy()
  want = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(math.log(3)) and got[1] > math.log(3)


def test_counts_follow_the_shares_and_sum_to_the_batch():
  assert outlier_sampling.counts(8, (0.5, 0.5)) == [4, 4]
  assert outlier_sampling.counts(7, (0.5, 0.5)) == [4, 3]
  assert sum(outlier_sampling.counts(13, (0.2, 0.3, 0.5))) == 13
  assert outlier_sampling.counts(10, (0.25, 0.75)) == [3, 7]


def test_bank_draws_do_not_depend_on_the_replica_split():
  bank = tf.constant(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1))
  whole = outlier_sampling.sample(bank, SEED, 8).numpy()
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  halves = strategy.run(lambda: outlier_sampling.sample(bank, SEED, 4))
  split = np.concatenate([t.numpy() for t in strategy.experimental_local_results(halves)])
  np.testing.assert_array_equal(split, whole)
  assert len(set(whole.ravel())) > 4  # Drawn, not the first rows.
  np.testing.assert_array_equal(whole * 255, np.round(whole * 255))


def test_noise_alone_is_the_papers_noise_and_a_mix_draws_each_source():
  config = support.tiny_step_config('ceda')
  images = tf.random.stateless_uniform([6, 12, 12, 1], seed=[1, 1])
  noise_fn = train_step.out_distribution(config)
  np.testing.assert_array_equal(
    noise_fn(images, SEED), noise_lib.make_noise(images, SEED, config.noise)
  )
  config.out_data.sources, config.out_data.shares = ('noise', 'photos'), (0.5, 0.5)
  with pytest.raises(ValueError, match='no bank'):
    train_step.out_distribution(config)
  bank = tf.fill([3, 12, 12, 1], tf.constant(255, tf.uint8))  # All-white outliers.
  got = train_step.out_distribution(config, {'photos': bank})(images, SEED).numpy()
  assert got.shape == (6, 12, 12, 1)
  noise_seed, _ = seed_streams.split(SEED, 2)
  np.testing.assert_array_equal(got[:3], noise_lib.make_noise(images[:3], noise_seed, config.noise))
  np.testing.assert_array_equal(got[3:], 1.0)


def _functional_tiny():
  inputs = keras.Input((12, 12, 1))
  x = keras.layers.Conv2D(4, 3, padding='same', activation='relu')(inputs)
  x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, activation='relu')(x)
  return keras.Model(inputs, keras.layers.Dense(3)(x))


def test_good_ramp_and_loss_interpolate_between_clean_and_bound():
  config = support.tiny_step_config('good')
  config.good.update(eps=0.2, q=0.5, weight=1.0, ramp_start=0.1, ramp_end=0.5)
  assert [float(v) for v in train_step.good_ramp(config, 10, 100)] == [0.0, 0.0]
  eps, weight = train_step.good_ramp(config, 30, 100)
  assert float(eps) == pytest.approx(0.1) and float(weight) == pytest.approx(0.5)
  eps, weight = train_step.good_ramp(config, 90, 100)
  assert float(eps) == pytest.approx(0.2) and float(weight) == pytest.approx(1.0)
  keras.utils.set_random_seed(0)
  model = _functional_tiny()
  out = tf.random.stateless_uniform([8, 12, 12, 1], seed=[2, 2])
  logits = model(out)
  got = train_step.out_loss(model, config, out, logits, 90, 100).numpy()
  clean = losses.max_log_confidence(logits).numpy()
  bound = ibp.log_confidence_upper_bound(model, out, 0.2).numpy()
  assert (bound >= clean - 1e-6).all()
  smallest = np.argsort(bound)[:4]  # q = 0.5 of 8: the bound loss on the 4 smallest bounds.
  want = clean.copy()
  want[smallest] = bound[smallest]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  early = train_step.out_loss(model, config, out, logits, 5, 100).numpy()
  np.testing.assert_allclose(early, clean, rtol=1e-6)  # Before the ramp: the clean loss.


def test_log_confidence_bound_holds_on_sampled_points():
  keras.utils.set_random_seed(3)
  model = _functional_tiny()
  x = tf.random.stateless_uniform([4, 12, 12, 1], seed=[5, 5])
  eps = 0.03
  bound = ibp.log_confidence_upper_bound(model, x, eps).numpy()
  rng = np.random.default_rng(0)
  worst = np.full(4, -np.inf)
  for _ in range(20):
    corners = np.clip(x + eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1).astype(np.float32)
    worst = np.maximum(worst, losses.max_log_confidence(model(corners)).numpy())
  assert (worst <= bound + 1e-5).all()
  assert (bound < -0.01).any()  # Informative: not the trivial bound log 1 = 0 everywhere.


def _train_tiny(method, steps=60):
  keras.utils.set_random_seed(0)
  config = support.tiny_step_config(method, batch=32)
  if method == 'good':
    config.good.update(eps=0.05, ramp_start=0.0, ramp_end=0.2)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = support.toy_data(256)
  with strategy.scope():
    model = _functional_tiny()
    optimizer = train_step.create_optimizer(config, steps)
    optimizer.build(model.trainable_variables)
  train = train_step.make_train_function(model, optimizer, config, strategy, total_steps=steps)
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 32)))
  sums, bad = train(it, tf.constant(steps))
  assert int(bad) == -1
  return model, sums


@pytest.mark.parametrize('method', ['oe', 'good'])
def test_oe_and_good_lower_the_confidence_on_noise_against_plain(method):
  uniform = tf.random.stateless_uniform([64, 12, 12, 1], seed=[9, 9])
  mmc = lambda model: float(tf.reduce_mean(tf.reduce_max(tf.nn.softmax(model(uniform)), -1)))
  plain, _ = _train_tiny('plain')
  model, sums = _train_tiny(method)
  assert float(sums['errors'] / sums['count_in']) < 0.3  # Still learns the task.
  assert mmc(model) < mmc(plain) - 0.1, (mmc(model), mmc(plain))
  if method == 'good':  # Trained on the bound at eps 0.05: certified low confidence there.
    bound = ibp.confidence_upper_bound(model, uniform, 0.05)
    plain_bound = ibp.confidence_upper_bound(plain, uniform, 0.05)
    assert float(tf.reduce_mean(bound)) < float(tf.reduce_mean(plain_bound)) - 0.1


@pytest.mark.parametrize(
  'change, message',
  [
    (lambda c: c.pgd.update(steps=5), 'uses no PGD'),
    (lambda c: c.out_data.update(sources=('mnist5k',), shares=(1.0,)), 'the in-distribution'),
    (lambda c: c.out_data.update(sources=('noise', 'photos'), shares=(0.5, 0.6)), 'sum to 1'),
    (lambda c: c.good.update(q=0.0), 'good.q'),
    (lambda c: c.update(mixed_precision='mixed_float16'), 'float32'),
  ],
)
def test_bad_outlier_configs_are_refused_before_training(change, message):
  from acet_tf.configs import mnist5k

  config = mnist5k.get_config('good,runlocal')
  change(config)
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(config)
