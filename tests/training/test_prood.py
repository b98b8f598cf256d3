"""Method prood: the discriminator's losses (BCE in on clean images, BCE out on the IBP bound of
the in-logit), joint and frozen-classifier training, config checks, and a trainer run that takes
its classifier from another run and restores as a ProodModel."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.configs import mnist5k
from acet_tf.models import prood
from acet_tf.robustness import ibp
from acet_tf.training import train_step
from acet_tf.training import trainer
from tests import support

SHAPE = (12, 12, 1)


def test_losses_are_bce_in_on_clean_images_and_bce_out_on_the_bound():
  model = support.tiny_prood()
  images = tf.random.stateless_uniform([6, *SHAPE], seed=[1, 2])
  out = tf.random.stateless_uniform([4, *SHAPE], seed=[3, 4])
  in_bce, out_bce, logits, mixture = train_step.prood_losses(model, images, out, 0.0, False)
  g_in, g_out = model.in_logit(images).numpy(), model.in_logit(out).numpy()
  np.testing.assert_allclose(in_bce, -np.log(1.0 / (1.0 + np.exp(-g_in))), rtol=1e-5)
  np.testing.assert_allclose(out_bce, -np.log(1.0 - 1.0 / (1.0 + np.exp(-g_out))), rtol=1e-4)
  both = tf.concat([images, out], 0)
  np.testing.assert_allclose(logits, model.classifier(both), rtol=1e-6)
  np.testing.assert_allclose(mixture, model(both), rtol=1e-6)
  # At eps > 0: the BCE of the bound, above the BCE of every sampled point of the ball.
  eps = 0.05
  _, wide, _, _ = train_step.prood_losses(model, images, out, eps, False)
  g_hi = ibp.in_logit_upper_bound(model.discriminator, out, eps).numpy()
  np.testing.assert_allclose(wide, np.log1p(np.exp(g_hi)), rtol=1e-5)
  lo, hi = ibp.input_box(out, eps)
  for i in range(6):
    u = lo + tf.random.stateless_uniform(out.shape, seed=[i, 5]) * (hi - lo)
    assert np.all(wide.numpy() >= np.log1p(np.exp(model.in_logit(u).numpy())) - 1e-6)
  assert np.all(wide.numpy() > out_bce.numpy())


def test_prood_ramp_is_goods_schedule():
  config = support.tiny_step_config('prood')
  config.prood.update(eps=0.2, ramp_start=0.1, ramp_end=0.5)
  assert float(train_step.prood_eps(config, 10, 100)) == 0.0
  assert float(train_step.prood_eps(config, 30, 100)) == pytest.approx(0.1)
  assert float(train_step.prood_eps(config, 90, 100)) == pytest.approx(0.2)
  assert float(train_step.prood_eps(config, None, 100)) == pytest.approx(0.2)


def _train(model, steps=100, eps=0.05):
  config = support.tiny_step_config('prood', batch=32)
  # The discriminator first learns in vs out on clean points, then the radius grows.
  config.prood.update(eps=eps, ramp_start=0.2, ramp_end=0.6)
  config.optimizer.update(name='adam', learning_rate=3e-3)
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  images, labels = support.toy_data(256)
  optimizer = train_step.create_optimizer(config, steps)
  optimizer.build(model.trainable_variables)
  train = train_step.make_train_function(model, optimizer, config, strategy, total_steps=steps)
  it = iter(strategy.experimental_distribute_dataset(support.toy_dataset(images, labels, 32)))
  sums, bad = train(it, tf.constant(steps))
  assert int(bad) == -1
  return sums


def test_joint_training_learns_the_task_and_certifies_low_confidence_on_noise():
  model = support.tiny_prood()
  uniform = tf.random.stateless_uniform([64, *SHAPE], seed=[9, 9])
  images, _ = support.toy_data(64, seed=1)
  before = ibp.confidence_upper_bound(model, uniform, 0.05).numpy()
  sums = _train(model)
  assert float(sums['errors'] / sums['count_in']) < 0.3
  # Measured: p(in) 0.52 on the in-images, 0.21 on uniform noise; the mean certified bound on
  # uniform noise at eps 0.05 from 0.67 to 0.58 (a toy run of 100 steps).
  p_in = lambda x: float(np.mean(tf.sigmoid(model.in_logit(x)).numpy()))
  assert p_in(images) > p_in(uniform) + 0.2, (p_in(images), p_in(uniform))
  after = ibp.confidence_upper_bound(model, uniform, 0.05).numpy()
  assert np.mean(after) < np.mean(before) - 0.05, (np.mean(after), np.mean(before))


def test_a_frozen_classifier_keeps_its_weights_and_the_discriminator_trains():
  model = support.tiny_prood(1)
  model.classifier.trainable = False
  classifier_before = [w.copy() for w in model.classifier.get_weights()]
  disc_before = [w.copy() for w in model.discriminator.get_weights()]
  assert len(model.trainable_variables) == len(model.discriminator.trainable_variables)
  _train(model, steps=10)
  for got, want in zip(model.classifier.get_weights(), classifier_before):
    np.testing.assert_array_equal(got, want)
  assert any(
    not np.array_equal(a, b) for a, b in zip(model.discriminator.get_weights(), disc_before)
  )


@pytest.mark.parametrize(
  'change, message',
  [
    (lambda c: c.prood.update(eps=-0.1), 'prood.eps'),
    (lambda c: c.prood.update(ramp_start=0.5, ramp_end=0.2), 'prood.ramp_start'),
    (lambda c: c.prood.update(disc_filters=(0,)), 'prood.disc_filters'),
    (lambda c: c.update(mixed_precision='mixed_float16'), 'float32'),
    (lambda c: c.update(classifier_workdir='/nonexistent/run'), 'holds no run'),
  ],
)
def test_bad_prood_configs_are_refused(change, message):
  config = mnist5k.get_config('prood,runlocal')
  change(config)
  with pytest.raises(ValueError, match=message):
    trainer.validate_config(config)


def _fake_classifier_run(workdir, dataset='mnist5k', model_name='lenet'):
  """A run directory holding a LeNet checkpoint and its config, as acet_tf.train writes them."""
  from acet_tf import models

  config = mnist5k.get_config('plain,runlocal')
  config.update(dataset=dataset, model=model_name)
  os.makedirs(runs.checkpoint_dir(workdir))
  runs.write_config(workdir, config)
  classifier = models.create_model('lenet', (28, 28, 1), 10)
  checkpoint = tf.train.Checkpoint(model=classifier)
  tf.train.CheckpointManager(checkpoint, runs.checkpoint_dir(workdir), 1).save(checkpoint_number=7)
  return classifier


def test_restore_classifier_refuses_another_dataset_or_a_prood_run(tmp_path):
  from acet_tf import models

  _fake_classifier_run(str(tmp_path / 'other'), dataset='mnist')
  config = mnist5k.get_config('prood')
  target = models.create_model('lenet', (28, 28, 1), 10)
  with pytest.raises(ValueError, match='must agree'):
    runs.restore_classifier(target, str(tmp_path / 'other'), config)
  os.makedirs(tmp_path / 'p')
  runs.write_config(str(tmp_path / 'p'), config)
  with pytest.raises(ValueError, match='is a prood run'):
    runs.restore_classifier(target, str(tmp_path / 'p'), config)


@pytest.mark.slow  # A trainer run, an evaluation and an export: about 30 s idle, minutes shared.
def test_trainer_takes_the_frozen_classifier_restores_and_exports_a_prood_model(tmp_path):
  source = _fake_classifier_run(str(tmp_path / 'plain'))
  config = mnist5k.get_config('prood,runlocal')
  config.out_data.update(sources=('noise',), shares=(1.0,))  # No photo bank: seconds.
  config.classifier_workdir = str(tmp_path / 'plain')
  config.eval.adv_noise_steps = 2
  seen = {}
  x = tf.random.stateless_uniform([4, 28, 28, 1], seed=[1, 1])
  trainer.train_and_evaluate(
    config, str(tmp_path / 'run'), hooks=[lambda step, ctx: seen.update(out=ctx.model(x).numpy())]
  )
  model, saved, _, step = runs.restore_model(str(tmp_path / 'run'))
  assert isinstance(model, prood.ProodModel) and step == config.num_train_steps
  assert saved.classifier_workdir == config.classifier_workdir
  np.testing.assert_allclose(model(x).numpy(), seen['out'], rtol=1e-6)
  for got, want in zip(model.classifier.get_weights(), source.get_weights()):
    np.testing.assert_array_equal(got, want)  # Frozen: the source run's weights, untouched.
  final = json.load(open(tmp_path / 'run' / runs.FINAL_METRICS))
  assert 'test/error' in final and final['step'] == config.num_train_steps
  # The export serves the mixture: its probabilities are the softmax of the ProoD logits.
  from acet_tf.exporting import exporter

  path, metadata = exporter.export_model(
    str(tmp_path / 'run'),
    str(tmp_path / 'export'),
    threshold=0.5,
    num_examples=16,
    adv_noise_examples=0,
  )
  assert metadata['method'] == 'prood'
  served = tf.saved_model.load(path).signatures['serving_default'](images=x)
  np.testing.assert_allclose(served['probabilities'], tf.nn.softmax(seen['out']), atol=1e-6)
  np.testing.assert_array_equal(served['predicted_class'], model.classifier(x).numpy().argmax(1))
