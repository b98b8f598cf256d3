"""A run directory and an export written by acet_tf 0.2.0 (tests/fixtures/v0_2_0, before the
subpackage layout) still restore, resume, evaluate and serve."""

import json
import os
import shutil

import numpy as np
import pytest
from werkzeug import test as werkzeug_test

from acet_tf.artifacts import runs
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import predictions
from acet_tf.evaluation import settings as settings_lib
from acet_tf.serving import rest_app
from acet_tf.training import trainer
from tests import support

FIXTURE = os.path.join(support.ROOT, 'tests', 'fixtures', 'v0_2_0')


@pytest.fixture
def old(tmp_path, monkeypatch):
  """A copy of the fixture as the working directory (its dataset path is relative)."""
  root = tmp_path / 'v0_2_0'
  shutil.copytree(FIXTURE, root)
  monkeypatch.chdir(root)
  with open(root / 'run' / 'final_metrics.json') as f:
    return {'root': root, 'final': json.load(f)}


def _demo_images(root):
  with open(root / 'demo.json') as f:
    return np.asarray(json.load(f)['instances'], np.float32)


def test_the_old_run_restores_and_evaluates_to_its_recorded_numbers(old, tmp_path):
  model, config, info, step = runs.restore_model('run')
  assert step == old['final']['step'] == 6
  assert info.image_shape == (4, 4, 1) and info.num_classes == 3
  settings = settings_lib.Settings(sets=('noise',), max_examples=1000, seed=0)
  results = evaluator.evaluate_run(settings, workdir='run', output_dir=str(tmp_path / 'eval'))
  # The trainer's final evaluation saw the same 60 test images with the same weights.
  assert results['test']['error'] == pytest.approx(old['final']['test/error'], abs=1e-9)
  assert results['test']['mmc'] == pytest.approx(old['final']['test/mmc'], abs=1e-6)
  assert results['model']['step'] == 6


def test_the_old_run_resumes_from_its_checkpoint(old):
  # The run is finished (6 of 6 steps): resuming restores model and optimizer state, trains
  # nothing and evaluates the same weights again.
  final = trainer.train_and_evaluate(runs.read_config('run'), 'run')
  assert final['step'] == 6
  assert final['test/error'] == pytest.approx(old['final']['test/error'], abs=1e-9)
  assert final['test/mmc'] == pytest.approx(old['final']['test/mmc'], abs=1e-6)
  assert runs.checkpoint_step(runs.latest_checkpoint('run')) == 6


def test_the_old_export_serves_what_the_old_run_predicts(old):
  model, _, _, _ = runs.restore_model('run')
  images = _demo_images(old['root'])
  want = predictions.make_predict_fn(model)(images).numpy()
  client = werkzeug_test.Client(rest_app.create_app('export', 'old'))
  status = client.get('/v1/models/old').get_json()
  assert status['model_version_status'][0]['version'] == '1'
  body = {'instances': images.tolist()}
  response = client.post('/v1/models/old:predict', json=body)
  assert response.status_code == 200, response.get_data(as_text=True)
  rows = response.get_json()['predictions']
  np.testing.assert_allclose([r['probabilities'] for r in rows], want, atol=1e-5)
  meta = client.get('/v1/models/old/metadata').get_json()['metadata']['acet_tf']
  assert meta['class_names'] == ['0', '1', '2']
  accepted = [r['accepted'] for r in rows]
  assert accepted == [bool(c >= meta['threshold']['value']) for c in want.max(axis=1)]


def test_the_old_export_evaluates_as_its_run(old, tmp_path):
  settings = settings_lib.Settings(sets=('noise',), max_examples=1000, seed=0)
  from_export = evaluator.evaluate_run(
    settings, saved_model='export', output_dir=str(tmp_path / 'export_eval')
  )
  assert from_export['test']['error'] == pytest.approx(old['final']['test/error'], abs=1e-9)
  assert from_export['test']['mmc'] == pytest.approx(old['final']['test/mmc'], abs=1e-5)
