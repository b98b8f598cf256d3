"""The evaluation binary end to end (mnist5k run, SavedModel, mock TFDS data) and its pieces.

The binary runs in-process (flags parsed, then main()): the same code as `python -m
acet_tf.evaluate` without a second TensorFlow start-up.
"""

import contextlib
import io
import json
import os
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf import evaluate  # The binary: main() runs in-process.
from acet_tf import models
from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.data import out_datasets
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import settings as settings_lib
from acet_tf.evaluation import units

MNIST_OUT = {'fmnist', 'emnist', 'gray_cifar10'}


@pytest.fixture(scope='module')
def run_dir(plain_run):
  return plain_run


def _offline():
  """No network, whatever the machine has: with an empty data_dir every TFDS set is unavailable."""
  return mock.patch.object(input_pipeline, '_network_available', lambda *a, **k: False)


# Small enough for seconds; batch = max_examples (= Table 2 draws by default): one trace each.
FLAGS_SMALL = (
  '--max_examples=32',
  '--batch_size=32',
  '--adv_noise_steps=3',
  '--adv_samples_steps=3',
)


@pytest.fixture(scope='module')
def binary_eval(run_dir, tmp_path_factory):
  """Runs the binary's main() on the run with every set: (output dir, printed text, empty dir)."""
  out = tmp_path_factory.mktemp('eval')
  empty = str(tmp_path_factory.mktemp('empty_tfds'))
  argv = [
    'evaluate',
    f'--workdir={run_dir}',
    f'--output_dir={out}',
    f'--data_dir={empty}',
    *FLAGS_SMALL,
  ]
  printed = io.StringIO()
  with flagsaver.flagsaver(), _offline(), contextlib.redirect_stdout(printed):
    flags.FLAGS(argv)
    evaluate.main(argv[:1])
  return out, printed.getvalue(), empty


def _tags(event_dir):
  tags = {}
  for name in os.listdir(event_dir):
    if name.startswith('events.out.tfevents'):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(event_dir, name)):
        for value in event.summary.value:
          tags[value.tag] = value
  return tags


# ------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_binary_end_to_end_on_a_mnist5k_run(run_dir, binary_eval):
  out, printed, _ = binary_eval
  assert {
    'results.json',
    'table.md',
    'confidence_histograms.png',
    'roc_curves.png',
    'image_grid.png',
  } <= set(os.listdir(out))
  results = json.loads((out / 'results.json').read_text())
  # Offline, the MNIST out-sets are skipped with a reason; the generated sets all ran.
  assert set(results['out_sets']) == {'noise', 'adv_noise', 'adv_samples'}
  assert set(results['skipped']) == MNIST_OUT
  assert all('not prepared' in reason for reason in results['skipped'].values())
  assert results['model']['source'] == 'checkpoint' and results['model']['step'] == 6
  assert results['test']['num_examples'] == 32
  assert results['out_sets']['noise']['num_examples'] == 32
  assert results['out_sets']['adv_samples']['num_attacked'] == 32
  assert results['settings']['adv_noise_steps'] == 3 and results['table2']['num_examples'] == 32
  assert 'fpr95' in results['definitions'] and results['versions']['tensorflow'] == tf.__version__

  # The test-set numbers are the restored model's on the first 32 test images.
  model, _, _, _ = runs.restore_model(run_dir)
  images, labels = next(iter(input_pipeline.eval_dataset('mnist5k', 'test', 32)))
  probs = tf.nn.softmax(model(images, training=False)).numpy()
  assert results['test']['error'] == pytest.approx(np.mean(probs.argmax(1) != labels.numpy()))
  assert results['test']['mmc'] == pytest.approx(probs.max(1).mean(), abs=1e-6)
  # PGD keeps the best point, the unperturbed noise image included: it never lowers confidence.
  assert results['out_sets']['adv_noise']['mmc'] >= results['out_sets']['noise']['mmc'] - 1e-6
  adv = results['out_sets']['adv_samples']
  assert adv['num_successful'] == round(adv['success_rate'] * 32)

  table = (out / 'table.md').read_text()
  assert table in printed  # The binary prints what it writes.
  noise = results['out_sets']['noise']
  assert (
    f'| Noise | 32 | {noise["mmc"]:.3f} | {noise["auroc"]:.3f} | {noise["fpr95"]:.3f} |' in table
  )
  assert f'TE: {100 * results["test"]["error"]:.2f}%' in table
  assert 'successful adversarial samples only' in table and '5th percentile' in table
  assert 'Skipped (not evaluated):' in table and '- grayCIFAR-10: ' in table

  tags = _tags(str(out))
  assert tf.make_ndarray(tags['eval/test/error'].tensor) == pytest.approx(results['test']['error'])
  for tag in (
    'eval/noise/auroc',
    'eval/adv_noise/fpr95',
    'eval/adv_samples/success_rate',
    'table2/median_alpha',
    'eval/images/adv_noise',
    'eval/plots/roc_curves',
  ):
    assert tag in tags, tag


@pytest.mark.slow
def test_strict_makes_an_unavailable_set_an_error(run_dir, binary_eval, tmp_path):
  _, _, empty = binary_eval
  with _offline(), pytest.raises(input_pipeline.DatasetUnavailableError, match='--strict'):
    evaluator.evaluate_run(
      settings_lib.Settings(sets=('fmnist',), strict=True, data_dir=empty),
      workdir=run_dir,
      output_dir=str(tmp_path),
    )


def _save_classifier(model, path):
  """A SavedModel with the export's serving_default interface, plus logits for the attacks."""
  module = tf.Module()
  module.model = model

  @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name='images')])
  def serving_default(images):
    logits = module.model(images, training=False)
    probs = tf.nn.softmax(logits)
    return {'probabilities': probs, 'confidence': tf.reduce_max(probs, axis=1), 'logits': logits}

  tf.saved_model.save(module, path, signatures={'serving_default': serving_default})


@pytest.mark.slow
def test_saved_model_gives_the_checkpoint_numbers(run_dir, binary_eval, tmp_path):
  out, _, empty = binary_eval
  ckpt = json.loads((out / 'results.json').read_text())
  export_dir = tmp_path / 'export'
  model, _, _, _ = runs.restore_model(run_dir)
  _save_classifier(model, str(export_dir / '1'))
  # The binary's settings (the seed defaults to the run's config.seed, 0).
  settings = settings_lib.Settings(
    max_examples=32,
    batch_size=32,
    adv_noise_steps=3,
    adv_samples_steps=3,
    data_dir=empty,
    num_grid_images=2,
  )
  with _offline():
    saved = evaluator.evaluate_run(
      settings, saved_model=str(export_dir), dataset='mnist5k', output_dir=str(tmp_path / 'saved')
    )
  assert saved['model']['source'] == 'saved_model'
  assert saved['model']['path'].endswith(os.path.join('export', '1'))  # The newest version.
  assert saved['model']['attack_logits'] == 'logits output'
  assert saved['test']['error'] == ckpt['test']['error']
  assert saved['test']['mmc'] == pytest.approx(ckpt['test']['mmc'], abs=1e-6)
  for key in ('mmc', 'auroc', 'fpr95'):
    assert saved['out_sets']['noise'][key] == pytest.approx(
      ckpt['out_sets']['noise'][key], abs=1e-5
    )
  assert saved['table2']['median'] == pytest.approx(ckpt['table2']['median'], rel=1e-4)
  # The same logits and seeds: the attacks take the same steps.
  for key in ('adv_noise', 'adv_samples'):
    assert saved['out_sets'][key]['mmc'] == pytest.approx(ckpt['out_sets'][key]['mmc'], abs=1e-5)
  # The dataset may come from the export's metadata; a different --dataset is refused.
  (export_dir / '1' / 'assets').mkdir(exist_ok=True)
  (export_dir / '1' / 'assets' / 'metadata.json').write_text(json.dumps({'dataset': 'mnist5k'}))
  with pytest.raises(ValueError, match='conflicting'):
    evaluator.evaluate_run(
      settings, saved_model=str(export_dir), dataset='mnist', output_dir=str(tmp_path / 'd')
    )
  (export_dir / '1' / 'assets' / 'metadata.json').unlink()
  with pytest.raises(ValueError, match='--dataset'):
    evaluator.evaluate_run(settings, saved_model=str(export_dir), output_dir=str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='--output_dir'):
    evaluator.evaluate_run(settings, saved_model=str(export_dir), dataset='mnist5k')


@pytest.mark.slow
def test_mock_tfds_data_end_to_end(tmp_path):
  # mock_data leaves info.splits empty and draws labels uniformly: nothing may depend on either.
  with tfds.testing.mock_data(num_examples=20):
    info = input_pipeline.get_info('mnist')
    predict_fn, logits_fn = saved_model_classifier.keras_model_fns(
      models.create_model('lenet', info.image_shape, info.num_classes)
    )
    settings = settings_lib.Settings(
      sets=('datasets', 'noise', 'adv_samples'),
      max_examples=16,
      batch_size=16,
      adv_samples_steps=2,
      seed=0,
      num_grid_images=2,
    )
    keys, _, _, _ = settings_lib.resolve_sets(settings, 'mnist')
    out_sets, skipped = out_datasets.load_out_sets(
      keys, info.image_shape, batch_size=16, max_examples=16, strict=True
    )
    test = input_pipeline.eval_dataset('mnist', 'test', 16, max_examples=16)
    results = evaluator.evaluate_model(
      predict_fn,
      info,
      test,
      settings,
      out_sets=out_sets,
      skipped=skipped,
      logits_fn=logits_fn,
      output_dir=str(tmp_path),
    )
  assert not results['skipped']
  assert set(results['out_sets']) == MNIST_OUT | {'noise', 'adv_samples'}
  for key in MNIST_OUT | {'noise'}:
    assert results['out_sets'][key]['num_examples'] == 16
    assert 0 <= results['out_sets'][key]['auroc'] <= 1
  assert 'table2' not in results and results['test']['num_examples'] == 16
  table = (tmp_path / 'table.md').read_text()
  assert '| grayCIFAR-10 | 16 |' in table and '| EMNIST (letters) | 16 |' in table
  assert '## Table 2' not in table


# ------------------------------------------------------------------------------------------------
# Out-of-distribution datasets.
# ------------------------------------------------------------------------------------------------


def test_cifar_out_sets_under_mock_data_and_imagenet_minus_without_a_folder():
  with tfds.testing.mock_data(num_examples=6):
    sets, skipped = out_datasets.load_out_sets(
      ('svhn', 'cifar100', 'lsun_classroom', 'imagenet_minus'), (32, 32, 3), batch_size=4
    )
    with pytest.raises(input_pipeline.DatasetUnavailableError, match='imagenet_minus_dir'):
      out_datasets.load_out_sets(('imagenet_minus',), (32, 32, 3), batch_size=4, strict=True)
  assert set(sets) == {'svhn', 'cifar100', 'lsun_classroom'}
  assert set(skipped) == {'imagenet_minus'} and '\n' not in skipped['imagenet_minus']
  for batches in sets.values():
    images = np.concatenate([b.numpy() for b in batches])
    # LSUN's mock images have random sizes: all come out at the in-distribution shape.
    assert images.shape == (6, 32, 32, 3) and images.min() >= 0 and images.max() <= 1


def test_emnist_out_set_is_transposed():
  with tfds.testing.mock_data(num_examples=3):
    raw = [e['image'].numpy() for e in tfds.builder('emnist/letters').as_dataset(split='test')]
    ours = list(out_datasets.load_out_set('emnist', (28, 28, 1)).as_numpy_iterator())
  assert len(ours) == 3
  for r, image in zip(raw, ours):
    np.testing.assert_array_equal(np.round(image * 255), r.transpose(1, 0, 2))


def test_to_image_shape_resizes_and_converts_colour():
  colour = np.array([0.9, 0.3, 0.0], np.float32)
  rgb = np.ones((40, 50, 3), np.float32) * colour
  grey = out_datasets.to_image_shape(rgb, (28, 28, 1)).numpy()
  assert grey.shape == (28, 28, 1)
  np.testing.assert_allclose(grey, colour.mean(), atol=1e-6)  # grayCIFAR: mean over channels.
  back = out_datasets.to_image_shape(grey, (32, 32, 3)).numpy()
  assert back.shape == (32, 32, 3)
  np.testing.assert_allclose(back, colour.mean(), atol=1e-6)
  same = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(out_datasets.to_image_shape(same, (28, 28, 1)), same)
  with pytest.raises(ValueError):
    out_datasets.to_image_shape(rgb, (28, 28, 2))


def test_imagenet_minus_from_a_folder(tmp_path):
  colours = [10, 60, 110, 160, 210]
  for i, value in enumerate(colours):
    folder = tmp_path / f'class{i % 2}'
    folder.mkdir(exist_ok=True)
    channels = 1 if i % 2 else 3
    image = np.full((20 + 7 * i, 30, channels), value, np.uint8)
    (folder / f'img{i}.png').write_bytes(tf.io.encode_png(image).numpy())
  (tmp_path / 'class0' / 'notes.txt').write_text('not an image')
  paths = out_datasets.image_files(str(tmp_path), 3, seed=1)
  assert len(paths) == 3 and paths == out_datasets.image_files(str(tmp_path), 3, seed=1)
  assert len(out_datasets.image_files(str(tmp_path), None)) == 5
  images = list(
    out_datasets.load_out_set(
      'imagenet_minus', (32, 32, 3), imagenet_minus_dir=str(tmp_path), max_examples=3, seed=1
    ).as_numpy_iterator()
  )
  assert [i.shape for i in images] == [(32, 32, 3)] * 3
  # Each file is one flat colour: the images are those of the chosen files, in that order.
  chosen = [colours[int(os.path.basename(p)[3])] for p in paths]
  np.testing.assert_allclose([i.mean() for i in images], np.array(chosen) / 255, atol=1e-5)
  with pytest.raises(input_pipeline.DatasetUnavailableError, match='does not exist'):
    out_datasets.load_out_set(
      'imagenet_minus', (32, 32, 3), imagenet_minus_dir=str(tmp_path / 'nope')
    )


# ------------------------------------------------------------------------------------------------
# Pieces.
# ------------------------------------------------------------------------------------------------


def test_adversarial_sample_metrics_use_the_successful_ones_only():
  in_conf = np.array([0.9, 0.8, 0.95, 0.7])
  conf = np.array([0.99, 0.6, 0.101, 0.5, 0.3])
  predicted = np.array([3, 1, 2, 0, 4])
  labels = np.array([3, 0, 2, 0, 1])
  # 0: still correct and confident (resisted); 1: wrong class; 2: correct class but only
  # 0.101 <= 1.01/10 (near uniform: success, the reference rule); 3: resisted; 4: wrong class.
  entry, success = units.adversarial_sample_metrics(in_conf, conf, predicted, labels, 10)
  np.testing.assert_array_equal(success, [False, True, True, False, True])
  assert entry['num_attacked'] == 5 and entry['num_successful'] == 3
  assert entry['success_rate'] == pytest.approx(0.6)
  assert entry['mmc_all'] == pytest.approx(conf.mean())
  expected = ood_metrics.ood_metrics(in_conf, conf[success])
  for key, value in expected.items():
    assert entry[key] == pytest.approx(value)
  none, success = units.adversarial_sample_metrics(in_conf, conf[:1], predicted[:1], labels[:1], 10)
  assert not success.any() and none['auroc'] is None and none['mmc'] is None


def test_log_probabilities_are_logits_with_finite_gradients():
  logits = tf.constant([[0.0, 1.0, 2.0], [0.0, 200.0, -200.0]])  # Row 2: two classes underflow.
  predict = lambda x: tf.nn.softmax(x)
  as_logits = saved_model_classifier.log_probabilities(predict)
  np.testing.assert_allclose(tf.nn.softmax(as_logits(logits)), tf.nn.softmax(logits), atol=1e-6)
  with tf.GradientTape() as tape:
    tape.watch(logits)
    objective = tf.reduce_sum(tf.reduce_max(tf.nn.log_softmax(as_logits(logits)), axis=1))
  grad = tape.gradient(objective, logits).numpy()
  assert np.isfinite(grad).all()
  # Row 1 as with true logits: d max_k log softmax_k / dz = onehot(argmax) - softmax.
  np.testing.assert_allclose(grad[0], [0, 0, 1] - tf.nn.softmax(logits[0]).numpy(), atol=1e-5)


def test_table2_is_skipped_for_a_model_that_refuses_unbounded_inputs():
  def bounded(images):
    tf.debugging.assert_less_equal(images, 1.0, 'images must be in [0, 1]')
    return tf.nn.softmax(tf.reshape(images, [tf.shape(images)[0], -1])[:, :3])

  assert not saved_model_classifier.accepts_unbounded_inputs(bounded, (2, 2, 1))
  assert saved_model_classifier.accepts_unbounded_inputs(
    lambda x: tf.nn.softmax(x[:, 0, 0]), (2, 2, 3)
  )


def test_settings_and_set_selection():
  with pytest.raises(ValueError, match='unknown sets'):
    settings_lib.Settings(sets=('noise', 'mnist_c'))
  for bad in (
    dict(max_examples=0),
    dict(adv_noise_restarts=0),
    dict(batch_size=0),
    dict(adv_samples_eps=-0.1),
  ):
    with pytest.raises(ValueError):
      settings_lib.Settings(**bad)
  keys, generated, table2, left_out = settings_lib.resolve_sets(settings_lib.Settings(), 'cifar10')
  assert keys == ('svhn', 'cifar100', 'lsun_classroom')
  assert generated == settings_lib.GENERATED_SETS and table2
  assert set(left_out) == {'imagenet_minus'}
  keys, _, _, left_out = settings_lib.resolve_sets(
    settings_lib.Settings(imagenet_minus_dir='/data/imagenet_minus'), 'svhn_cropped'
  )
  assert keys == ('cifar10', 'cifar100', 'lsun_classroom', 'imagenet_minus') and not left_out
  assert settings_lib.resolve_sets(settings_lib.Settings(sets=('fmnist', 'noise')), 'mnist') == (
    ('fmnist',),
    ('noise',),
    False,
    {},
  )
  with pytest.raises(ValueError, match='No out-distribution datasets'):
    settings_lib.resolve_sets(settings_lib.Settings(), 'imagenet2012')
  assert settings_lib.table2_examples(settings_lib.Settings()) == 10_000
  assert settings_lib.table2_examples(settings_lib.Settings(max_examples=32)) == 32
  assert (
    settings_lib.table2_examples(settings_lib.Settings(max_examples=32, table2_examples=64)) == 64
  )
  assert settings_lib.adv_samples_budget(settings_lib.Settings(), (28, 28, 1)) == (0.3, 0.0075)
  assert settings_lib.adv_samples_budget(settings_lib.Settings(), (32, 32, 3)) == (0.1, 0.0025)
