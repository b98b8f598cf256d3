"""The evaluator units: which run, and the trainer's and the export's numbers through them.

The trainer's periodic evaluation and the export's calibration and accept rates used to build
their own noise and adversarial noise; they now run the evaluator units 'test', 'noise' and
'adv_noise'. The `_before_*` functions below are that older code (commit 0ef0fd9, written out with
the primitives of acet_tf.evaluation.predictions), and the tests require the units to give the
same numbers bit for bit.
"""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.artifacts import runs
from acet_tf.configs import mnist5k
from acet_tf.data import input_pipeline
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.evaluation import settings as settings_lib
from acet_tf.evaluation import training_sets
from acet_tf.evaluation import units
from acet_tf.exporting import calibration
from acet_tf.ops import pgd


def _before_trainer(model, config, test_dataset):
  """evaluate_during_training as it was: (scalars, images)."""
  predict = predictions_lib.make_predict_fn(model)
  test = predictions_lib.predict_batches(predict, test_dataset)
  noise = list(
    predictions_lib.noise_batches(
      test_dataset,
      predictions_lib.eval_seed(config.seed, predictions_lib.NOISE_STREAM),
      config.noise,
    )
  )
  noise_pred = predictions_lib.predict_batches(predict, noise)
  adv = list(
    predictions_lib.attack_batches(
      model,
      predictions_lib.take_examples(noise, config.eval.adv_noise_examples),
      pgd.max_log_confidence_objective,
      eps=config.eval.adv_noise_eps,
      step_size=config.eval.adv_noise_step_size,
      steps=config.eval.adv_noise_steps,
      seed=predictions_lib.eval_seed(config.seed, predictions_lib.ADV_NOISE_STREAM),
    )
  )
  adv_pred = predictions_lib.predict_batches(predict, adv)
  scalars = {
    'test/error': ood_metrics.error_rate(test.predicted, test.labels),
    'test/mmc': ood_metrics.mean_max_confidence(test.confidence),
    'noise/mmc': ood_metrics.mean_max_confidence(noise_pred.confidence),
    'adv_noise/mmc': ood_metrics.mean_max_confidence(adv_pred.confidence),
  }
  n = config.num_summary_images
  return scalars, {'noise': noise[0][0][:n].numpy(), 'adv_noise': adv[0][0][:n].numpy()}


def _before_export(model, config, num_examples, adv_noise_examples, info):
  """calibration.measure_sets as it was: {name: (images, Predictions)}."""
  predict = predictions_lib.make_predict_fn(model)
  noise_config = config.noise
  if info.has_data:
    test = list(
      input_pipeline.eval_dataset(
        config.dataset,
        'test',
        config.eval.batch_size,
        data_dir=config.data_dir or None,
        max_examples=num_examples,
        options=input_pipeline.options_from_config(config),
      )
    )
    sets = {'test': test}
  else:
    size = config.eval.batch_size
    test = [
      (
        tf.zeros([min(size, num_examples - i), *info.image_shape]),
        tf.zeros([min(size, num_examples - i)], tf.int32),
      )
      for i in range(0, num_examples, size)
    ]
    noise_config = config.noise.copy_and_resolve_references()
    noise_config.permuted_fraction = 0.0
    sets = {}
  noise = list(
    predictions_lib.noise_batches(
      test, predictions_lib.eval_seed(config.seed, predictions_lib.NOISE_STREAM), noise_config
    )
  )
  sets['noise'] = noise
  if adv_noise_examples:
    sets['adv_noise'] = list(
      predictions_lib.attack_batches(
        model,
        predictions_lib.take_examples(noise, adv_noise_examples),
        pgd.max_log_confidence_objective,
        eps=config.eval.adv_noise_eps,
        step_size=config.eval.adv_noise_step_size,
        steps=config.eval.adv_noise_steps,
        seed=predictions_lib.eval_seed(config.seed, predictions_lib.ADV_NOISE_STREAM),
      )
    )
  return {
    name: (
      np.concatenate([np.asarray(x) for x, _ in b]),
      predictions_lib.predict_batches(predict, b),
    )
    for name, b in sets.items()
  }


def _small_run():
  """An untrained LeNet and a runlocal mnist5k config whose sets span several batches."""
  config = mnist5k.get_config('plain,runlocal')
  config.seed = 3
  config.eval.batch_size = 24  # 64 test images: batches of 24, 24 and 16.
  config.eval.adv_noise_examples = 30  # Ends inside the second batch.
  info = input_pipeline.get_info(config.dataset)
  keras.utils.set_random_seed(0)
  return models.create_model(config.model, info.image_shape, info.num_classes), config, info


def _test_dataset(config):
  return input_pipeline.eval_dataset(
    config.dataset, 'test', config.eval.batch_size, max_examples=config.eval.max_examples
  )


def _assert_same_sets(new, old):
  assert list(new) == list(old)
  for name, (images, pred) in old.items():
    np.testing.assert_array_equal(new[name][0], images, err_msg=name)
    for field in ('confidence', 'predicted', 'labels'):
      np.testing.assert_array_equal(getattr(new[name][1], field), getattr(pred, field), name)


def test_trainer_evaluation_runs_the_units_with_the_numbers_of_before():
  model, config, info = _small_run()
  test = _test_dataset(config)
  scalars, images = training_sets.evaluate_during_training(model, config, info, test)
  old_scalars, old_images = _before_trainer(model, config, _test_dataset(config))
  assert scalars == old_scalars  # Bit for bit, not approximately.
  for key, batch in old_images.items():
    np.testing.assert_array_equal(images[key], batch)
  # The units ran with the run's settings: 30 attacked noise images, one restart.
  ctx = training_sets.evaluate_training_sets(model, config, info, _test_dataset(config))
  assert ctx.units == ('test', 'out_sets', 'noise', 'adv_noise')
  assert len(ctx.predictions['adv_noise'].confidence) == 30
  assert ctx.results['out_sets']['noise']['num_examples'] == 64
  assert ctx.settings.seed == 3 and ctx.settings.adv_noise_steps == config.eval.adv_noise_steps


@pytest.mark.parametrize('has_data', [True, False])
def test_export_sets_run_the_units_with_the_numbers_of_before(has_data):
  model, config, info = _small_run()
  info = dataclasses.replace(info, has_data=has_data)
  new = calibration.measure_sets(model, config, info, 40, 30)
  old = _before_export(model, config, 40, 30, info)
  _assert_same_sets(new, old)
  assert ('test' in new) == has_data and len(new['adv_noise'][1].labels) == 30
  for threshold in (0.1, 0.5):
    assert calibration.accept_rates(new, threshold) == calibration.accept_rates(old, threshold)
  no_attack = calibration.measure_sets(model, config, info, 40, 0)
  assert 'adv_noise' not in no_attack
  np.testing.assert_array_equal(no_attack['noise'][0], old['noise'][0])


@pytest.mark.slow
def test_trainer_final_metrics_are_the_numbers_of_before(plain_run):
  model, config, _, _ = runs.restore_model(plain_run)
  test = input_pipeline.eval_dataset(
    config.dataset,
    'test',
    config.eval.batch_size,
    data_dir=config.data_dir or None,
    max_examples=config.eval.max_examples,
    options=input_pipeline.options_from_config(config),
  )
  scalars, _ = _before_trainer(model, config, test)
  final = runs.read_json(plain_run, runs.FINAL_METRICS)
  assert {key: final[key] for key in scalars} == scalars


@pytest.mark.slow
def test_export_threshold_and_accept_rates_are_the_numbers_of_before(exported_run):
  model, config, info, _ = runs.restore_model(exported_run['workdir'])
  sets = _before_export(
    model, config, config.eval.max_examples, config.eval.adv_noise_examples, info
  )
  test = sets['test'][1]
  value = ood_metrics.calibrate_threshold(test.confidence, test.predicted == test.labels, 0.95)
  threshold = exported_run['metadata']['threshold']
  assert threshold['value'] == value
  assert threshold['accept_rates'] == calibration.accept_rates(sets, value)
  assert threshold['mmc'] == {
    name: ood_metrics.mean_max_confidence(pred.confidence) for name, (_, pred) in sets.items()
  }


def test_settings_from_a_training_config():
  config = mnist5k.get_config('acet,runlocal')
  s = settings_lib.settings_from_training_config(config, max_examples=10)
  assert (s.max_examples, s.batch_size, s.seed) == (10, config.eval.batch_size, config.seed)
  assert s.adv_noise_examples == config.eval.adv_noise_examples and s.adv_noise_restarts == 1
  assert (s.adv_noise_steps, s.adv_noise_eps, s.adv_noise_step_size) == (
    config.eval.adv_noise_steps,
    config.eval.adv_noise_eps,
    config.eval.adv_noise_step_size,
  )
  assert s.sets == ('noise', 'adv_noise') and not s.attacked_sets
  with pytest.raises(ValueError, match='adv_noise_examples must be > 0'):
    settings_lib.Settings(adv_noise_examples=0)


def test_units_chosen_by_the_settings():
  def chosen(settings, skipped=(), **kw):
    requested = settings_lib.requested_sets(settings, skipped)
    return units.select_units(settings, requested, **kw)

  paper = settings_lib.Settings()
  everything = ('test', 'out_sets', 'noise', 'adv_noise', 'adv_samples', 'table2')
  assert chosen(paper, has_data=True, true_logits=False) == everything
  assert chosen(paper, has_data=True, true_logits=True) == everything[:5] + ('scores', 'table2')
  # Without the data: no adversarial samples, no scores (nothing to compare with).
  assert 'adv_samples' not in chosen(paper, has_data=False, true_logits=True)
  assert 'scores' not in chosen(paper, has_data=False, true_logits=True)
  assert chosen(paper, ('table2',), has_data=True, true_logits=False) == everything[:5]
  robust = settings_lib.Settings(sets=('noise',), attacked_sets=('adv_noise',), guaranteed=True)
  chosen = chosen(robust, has_data=True, true_logits=False)
  assert chosen == ('test', 'out_sets', 'noise', 'attacked')
  assert list(units.UNITS) == [*everything[:5], 'attacked', 'scores', 'table2']


def test_evaluate_model_attacks_the_first_adv_noise_examples(tmp_path):
  model, config, info = _small_run()
  settings = settings_lib.Settings(
    sets=('noise', 'adv_noise'),
    max_examples=40,
    batch_size=24,
    adv_noise_steps=2,
    adv_noise_examples=30,
    seed=1,
  )
  predict_fn = predictions_lib.make_predict_fn(model)
  results = evaluator.evaluate_model(
    predict_fn, info, _test_dataset(config), settings, output_dir=str(tmp_path)
  )
  assert results['out_sets']['noise']['num_examples'] == 40
  assert results['out_sets']['adv_noise']['num_examples'] == 30
  assert results['settings']['adv_noise_examples'] == 30
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['settings']['adv_noise_examples'] == 30
  assert os.path.exists(tmp_path / 'image_grid.png')
