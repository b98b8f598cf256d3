"""The evaluation beyond the paper through acet_tf.evaluate: eval configs, attacked sets (worst
case >= every attack >= the paper's), guaranteed (IBP) metrics above the worst case, scores side by
side, the photo-patch and folder out-sets."""

import contextlib
import io
import json
import pathlib
import re

from absl import flags
from absl.testing import flagsaver
import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import evaluate  # The binary: main() runs in-process.
from acet_tf import models
from acet_tf.configs import eval as eval_config
from acet_tf.data import input_pipeline
from acet_tf.data import out_datasets
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import robust_metrics
from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import scores
from acet_tf.evaluation import settings as settings_lib
from acet_tf.ops import seed_streams
from acet_tf.robustness import attack_spec
from tests import support


def test_paper_config_is_the_protocol_of_the_flags_alone():
  # Same Settings -> the same code path and seeds as the binary without --config.
  assert (
    settings_lib.settings_from_config(eval_config.get_config('paper')) == settings_lib.Settings()
  )
  strong = settings_lib.settings_from_config(eval_config.get_config('strong'))
  assert {a.name for a in strong.attacks} == {
    'pgd',
    'apgd',
    'pgd_decay',
    'apgd_t',
  } and strong.guaranteed
  decay = {a.name: a for a in strong.attacks}['pgd_decay']
  assert decay.schedule == ((60, 0.1), (80, 0.025), (60, 1 / 150)) and decay.restarts == 5
  assert 'photos' in strong.sets and strong.attacked_sets == ('adv_noise', 'out_sets')
  small = settings_lib.settings_from_config(
    eval_config.get_config('strong,runlocal'), max_examples=8
  )
  assert small.max_examples == 8 and all(a.steps == 5 for a in small.attacks)
  with pytest.raises(ValueError, match='one of'):
    eval_config.get_config('paper,strong')
  with pytest.raises(ValueError, match='attacked_sets'):
    settings_lib.Settings(attacked_sets=('nope',), guaranteed=True)
  with pytest.raises(ValueError, match='name=folder'):
    settings_lib.parse_image_dirs(['nofolder'])


def small_setup(seed=0):
  keras.utils.set_random_seed(seed)
  info = input_pipeline.DatasetInfo(
    name='mnist5k',
    image_shape=(28, 28, 1),
    num_classes=10,
    num_train_examples=0,
    num_test_examples=24,
    class_names=tuple(str(i) for i in range(10)),
  )
  model = models.create_model('lenet', info.image_shape, info.num_classes)
  x = tf.random.stateless_uniform([24, 28, 28, 1], seed=[1, 2])
  y = tf.argmax(model(x), axis=1, output_type=tf.int32)
  test = [(x[:12], y[:12]), (x[12:], y[12:])]
  photos = list(out_datasets.load_out_set('photos', info.image_shape, max_examples=24).batch(12))
  return info, model, test, {'photos': photos}


def test_attacked_sets_worst_case_guaranteed_and_scores(tmp_path):
  info, model, test, out_sets = small_setup()
  predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
  settings = settings_lib.settings_from_config(
    eval_config.get_config('strong,runlocal'),
    sets=('noise', 'adv_noise'),
    max_examples=24,
    batch_size=12,
    seed=0,
    num_grid_images=2,
    attacked_eps=0.01,
    table2_examples=8,
  )
  results = evaluator.evaluate_model(
    predict_fn,
    info,
    test,
    settings,
    out_sets=out_sets,
    logits_fn=logits_fn,
    keras_model=model,
    true_logits=True,
    output_dir=str(tmp_path),
  )
  attacked = results['attacked']
  assert set(attacked) == {'adv_noise', 'photos'}
  noise = attacked['adv_noise']
  assert set(noise['attacks']) == {
    'paper@noise',
    'clean@noise',
    'pgd@noise',
    'apgd@noise',
    'pgd_decay@noise',
    'apgd_t@noise',
    'clean@uniform',
    'pgd@uniform',
    'apgd@uniform',
    'pgd_decay@uniform',
    'apgd_t@uniform',
  }
  assert noise['attacks']['paper@noise']['mmc'] == results['out_sets']['adv_noise']['mmc']
  assert set(noise['worst_case']) == {'noise', 'uniform'}
  assert set(noise['guaranteed']) == {'noise', 'uniform', 'pooled'}
  assert set(attacked['photos']['worst_case']) == {'image'}
  assert 'pooled_worst_case' not in attacked['photos']
  for entry in attacked.values():
    for start, w in entry['worst_case'].items():
      assert {'mmc', 'auroc', 'fpr95', 'aupr_in', 'aupr_out', 'num_examples'} <= set(w)
      # Only this start's attacks (and its clean point) are candidates of its worst case.
      assert all(k.endswith(f'@{start}') for k in w['found_by'])
      assert f'clean@{start}' in w['found_by']
      for k, a in entry['attacks'].items():
        if k.endswith(f'@{start}'):
          assert w['mmc'] >= a['mmc'] - 1e-12 and w['auroc'] <= a['auroc'] + 1e-12
      # Certified bounds are above whatever any attack found.
      g = entry['guaranteed'][start]
      assert g['mmc'] >= w['mmc'] - 1e-5
      assert g['auroc'] <= w['auroc'] + 1e-9
  pooled = noise['pooled_worst_case']
  assert pooled['mmc'] >= max(w['mmc'] for w in noise['worst_case'].values()) - 1e-12
  assert noise['guaranteed']['pooled']['mmc'] >= pooled['mmc'] - 1e-5
  assert attacked['photos']['eps'] == 0.01 and attacked['adv_noise']['eps'] == 0.3
  # The photo row is clean; its attacked counterpart cannot be less confident.
  photos = attacked['photos']['worst_case']['image']
  assert photos['mmc'] >= results['out_sets']['photos']['mmc'] - 1e-6
  # Scores: max softmax equals the Table 1 confidences (same forward pass).
  s = results['scores']['photos']['max_softmax']
  assert s['auroc'] == results['out_sets']['photos']['auroc']
  assert s['fpr95_in_positive'] == results['out_sets']['photos']['fpr95']
  assert set(results['scores']['noise']) == set(scores.SCORES)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert 'auroc' in saved['attacked']['photos']['guaranteed']['image']
  table = (tmp_path / 'table.md').read_text()
  assert '## Worst case over attacks, per start distribution' in table
  assert '| pooled (max over starts) |' in table and '## Scores side by side' in table


def test_scores_path_gives_the_numbers_of_the_predict_path():
  info, model, test, out_sets = small_setup(1)
  predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
  settings = settings_lib.Settings(
    sets=('noise', 'adv_noise'), max_examples=24, batch_size=12, adv_noise_steps=3, seed=0
  )
  a = evaluator.evaluate_model(
    predict_fn, info, test, settings, out_sets=out_sets, logits_fn=logits_fn, true_logits=True
  )
  b = evaluator.evaluate_model(
    predict_fn, info, test, settings, out_sets=out_sets, logits_fn=logits_fn
  )
  assert a['test'] == b['test']
  for key in b['out_sets']:
    for m in ('mmc', 'auroc', 'fpr95', 'aupr_in', 'aupr_out'):
      assert a['out_sets'][key][m] == b['out_sets'][key][m], (key, m)
  assert 'scores' in a and 'scores' not in b


def test_fpr95_conventions_differ_as_defined():
  in_s = np.arange(50, 151)  # Integer scores: exact percentiles.
  out_s = np.arange(0, 61)
  m = scores.detection_metrics(in_s, out_s)
  # In-positive: threshold 55 (5th percentile of in); out at or above it: 55..60.
  assert m['fpr95_in_positive'] == 6 / 61
  # Out-positive: threshold 57 (95th percentile of out); in at or below it: 50..57.
  assert m['fpr95_out_positive'] == 8 / 101


def test_photo_patches_and_any_folder_as_out_set(tmp_path):
  grey = list(out_datasets.load_out_set('photos', (28, 28, 1), max_examples=5))
  colour = list(out_datasets.load_out_set('photos', (32, 32, 3), max_examples=5))
  assert [g.shape for g in grey] == [(28, 28, 1)] * 5 and colour[0].shape == (32, 32, 3)
  assert len(out_datasets.photo_patches()) > 500  # Enough for 500-point evaluations.
  # Patches come from several photographs: they are not all alike.
  assert np.std([float(tf.reduce_mean(c)) for c in colour]) > 0.02
  for i in range(3):
    (tmp_path / f'{i}.png').write_bytes(
      tf.io.encode_png(np.full((40, 50, 3), 40 * i, np.uint8)).numpy()
    )
  images = list(out_datasets.load_out_set('mine', (28, 28, 1), image_dirs={'mine': str(tmp_path)}))
  np.testing.assert_allclose(
    [float(i.numpy().mean()) for i in images], [0, 40 / 255, 80 / 255], atol=1e-5
  )
  with pytest.raises(ValueError, match='image_dirs'):
    out_datasets.load_out_set('mine', (28, 28, 1))


FLAGS_SMALL = (
  '--max_examples=16',
  '--batch_size=16',
  '--adv_noise_steps=3',
  '--adv_samples_steps=3',
  '--table2_examples=16',
)


@pytest.mark.slow
def test_binary_paper_config_gives_the_numbers_of_the_flags(plain_run, tmp_path):
  outs = {}
  for name, extra in (('flags', ()), ('config', ('--config=configs/eval.py:paper',))):
    out = tmp_path / name
    argv = [
      'evaluate',
      f'--workdir={plain_run}',
      f'--output_dir={out}',
      f'--data_dir={tmp_path / "empty"}',
      *FLAGS_SMALL,
      *extra,
    ]
    with flagsaver.flagsaver(), contextlib.redirect_stdout(io.StringIO()):
      flags.FLAGS(argv)
      evaluate.main(argv[:1])
    outs[name] = json.loads((out / 'results.json').read_text())
  # Every number and setting alike; only the clock differs.
  a, b = (_without_timing(outs[name]) for name in ('flags', 'config'))
  assert a == b
  assert set(a['out_sets']) == {'noise', 'adv_noise', 'adv_samples'} and 'table2' in a


def _without_timing(value):
  if isinstance(value, dict):
    return {k: _without_timing(v) for k, v in value.items() if k not in ('timing', 'seconds')}
  return value


def test_data_free_attacked_noise_reports_mmc_only(tmp_path):
  info, model, _, _ = small_setup(2)
  predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
  settings = settings_lib.settings_from_config(
    eval_config.get_config('strong,runlocal'),
    sets=('adv_noise',),
    max_examples=8,
    batch_size=8,
    seed=0,
    adv_noise_starts=('uniform',),
    attacked_sets=('adv_noise',),
  )
  results = evaluator.evaluate_model(
    predict_fn,
    info,
    None,
    settings,
    logits_fn=logits_fn,
    keras_model=model,
    true_logits=True,
    output_dir=str(tmp_path),
  )
  entry = results['attacked']['adv_noise']
  assert set(entry['attacks']) == {
    'clean@uniform',
    'pgd@uniform',
    'apgd@uniform',
    'pgd_decay@uniform',
    'apgd_t@uniform',
  }
  w, g = entry['worst_case']['uniform'], entry['guaranteed']['uniform']
  assert w['auroc'] is None and g['auroc'] is None
  assert g['mmc'] >= w['mmc'] - 1e-5
  assert 'pooled_worst_case' not in entry and 'pooled' not in entry['guaranteed']
  assert 'scores' not in results
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert 'mmc' in saved['attacked']['adv_noise']['guaranteed']['uniform']


def test_every_random_stream_has_its_own_value_and_is_defined_in_one_place():
  values = list(seed_streams.STREAMS.values())
  assert len(values) == len(set(values)), seed_streams.STREAMS
  assert len(values) >= 8
  # A stream constant given a number anywhere else would bypass the registry.
  root = pathlib.Path(support.ROOT)
  literal = re.compile(r'^\s*[A-Z0-9_]*_STREAM\s*=\s*\d', re.M)
  offenders = [
    str(p.relative_to(root))
    for folder in ('acet_tf', 'tools', 'configs')
    for p in (root / folder).rglob('*.py')
    if p.name != 'seed_streams.py' and literal.search(p.read_text())
  ]
  assert not offenders, offenders


def test_attacked_set_seeds_depend_on_the_whole_name():
  seed = lambda name: tuple(robust_metrics.name_seed(0, name).numpy())
  assert seed('cifar10') != seed('cifar100')  # Equal while the first 7 bytes made the seed.
  assert seed('cifar10') == seed('cifar10')
  names = ['cifar10', 'cifar100', 'svhn_cropped', 'noise', 'uniform', 'photos', 'points', 'lsun']
  assert len({seed(n) for n in names}) == len(names)


def test_worst_case_per_start_has_the_clean_point_with_apgd_alone():
  keras.utils.set_random_seed(4)
  model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(5)])
  predict_fn = lambda u: tf.nn.softmax(model(u, training=False))
  logits_fn = lambda u: model(u, training=False)
  noise = [
    (tf.random.stateless_uniform([8, 6, 6, 1], seed=[1, i]), tf.zeros([8], tf.int32))
    for i in range(2)
  ]
  uniform = [
    (tf.random.stateless_uniform([8, 6, 6, 1], seed=[2, i]), tf.zeros([8], tf.int32))
    for i in range(2)
  ]
  # APGD with no step: its random start, below the centre's confidence for about half the points.
  attack = attack_spec.Attack('apgd', 'apgd', 0)
  in_conf = np.linspace(0.5, 1.0, 16)
  entry, worst = robust_metrics.attacked_set(
    logits_fn,
    predict_fn,
    in_conf,
    {'noise': noise, 'uniform': uniform},
    [attack],
    eps=0.3,
    seed=tf.constant([0, 0], tf.int64),
  )
  for start, batches in (('noise', noise), ('uniform', uniform)):
    clean = np.concatenate([np.max(predict_fn(x).numpy(), axis=1) for x, _ in batches])
    assert np.all(worst[start] >= clean - 1e-7)
    apgd_conf = entry['attacks'][f'apgd@{start}']['mmc']
    assert entry['worst_case'][start]['mmc'] >= max(apgd_conf, clean.mean()) - 1e-9
  pooled = np.maximum(worst['noise'], worst['uniform'])
  assert entry['pooled_worst_case']['mmc'] == pytest.approx(pooled.mean())
