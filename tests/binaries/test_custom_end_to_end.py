"""Your own data end to end: train ACET (runlocal), evaluate, export and serve; the served answer
carries your class names. For a folder of PNG/JPEG images, an .npz file and a model by name."""

import json
import os
import re
import urllib.request

import numpy as np
import pytest
from werkzeug import test as werkzeug_test

from acet_tf.configs import custom
from acet_tf.data import input_pipeline
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import settings as settings_lib
from acet_tf.exporting import exporter
from acet_tf.serving import rest_app
from acet_tf.serving import served_model
from acet_tf.training import trainer
from tests import support
from tools import make_image_folder

ROOT = support.ROOT
NAMES = list(make_image_folder.CLASSES)  # circle, square, triangle.


def train_evaluate_export(tmp_path, arg):
  """Trains configs/custom.py:`arg`, evaluates and exports it; returns (export dir, results)."""
  config = custom.get_config(arg)
  config.strategy = 'one_device'
  config.eval.every_steps = 1000  # Only the final evaluation.
  workdir, export_dir = str(tmp_path / 'run'), str(tmp_path / 'export')
  final = trainer.train_and_evaluate(config, workdir)
  assert final['step'] == config.num_train_steps
  settings = settings_lib.Settings(
    sets=('noise', 'adv_noise'), max_examples=16, batch_size=16, adv_noise_steps=2
  )
  results = evaluator.evaluate_run(settings, workdir=workdir)
  # The evaluation table speaks of the classes by name.
  assert list(results['test']['per_class']) == NAMES
  per_class = results['test']['per_class']
  assert sum(e['num_examples'] for e in per_class.values()) == results['test']['num_examples']
  assert all(e['num_examples'] > 0 for e in per_class.values())  # A stratified test split.
  with open(os.path.join(workdir, 'eval', 'table.md')) as f:
    table = f.read()
  for name in NAMES:
    assert re.search(rf'^\| {name} \| \d+ \|', table, re.M), table
  _, metadata = exporter.export_model(workdir, export_dir, num_examples=16, adv_noise_examples=0)
  assert metadata['class_names'] == NAMES
  return export_dir, config


def held_out_images(config, n=6):
  images, labels = next(
    iter(
      input_pipeline.eval_dataset(
        config.dataset, 'test', n, options=input_pipeline.options_from_config(config)
      )
    )
  )
  return images.numpy(), labels.numpy()


def assert_named(rows, names=NAMES):
  assert rows and all(set(r) >= {'class_name', 'predicted_class', 'confidence'} for r in rows)
  for r in rows:
    assert r['class_name'] == names[r['predicted_class']]


def predict_in_process(export_dir, images, signature='serving_default'):
  client = werkzeug_test.Client(rest_app.RestApp(served_model.ServedModel(export_dir), 'mine'))
  body = {'signature_name': signature, 'instances': images.tolist()}
  response = client.post('/v1/models/mine:predict', json=body)
  assert response.status_code == 200, response.get_data(as_text=True)
  meta = client.get('/v1/models/mine/metadata').get_json()
  assert meta['metadata']['acet_tf']['class_names'] == NAMES
  return response.get_json()['predictions']


@pytest.mark.slow
def test_image_folder_to_served_class_names(tmp_path):
  folder = str(tmp_path / 'shapes')
  make_image_folder.write_folder(folder, per_class=16, size=16)
  files = os.listdir(os.path.join(folder, 'circle'))
  assert any(f.endswith('.png') for f in files) and any(f.endswith('.jpg') for f in files)
  export_dir, config = train_evaluate_export(
    tmp_path, f'acet,data=folder:{folder},model=lenet,runlocal'
  )
  images, _ = held_out_images(config)
  # The real server binary over HTTP, as a user would run it.
  proc, url = support.start_server(export_dir, 'shapes', tmp_path / 'server.txt')
  try:
    base = f'{url}/v1/models/shapes'
    request = urllib.request.Request(
      f'{base}:predict', data=json.dumps({'instances': images.tolist()}).encode()
    )
    with urllib.request.urlopen(request, timeout=120) as response:
      rows = json.load(response)['predictions']
    u8 = np.round(images * 255).astype(np.uint8)
    request = urllib.request.Request(
      f'{base}:predict',
      data=json.dumps({'signature_name': 'serving_uint8', 'inputs': u8.tolist()}).encode(),
    )
    with urllib.request.urlopen(request, timeout=120) as response:
      columns = json.load(response)['outputs']
  finally:
    proc.kill()
    proc.wait()
  assert len(rows) == len(images)
  assert_named(rows)
  # Columnar answers name the classes too, and agree with the float signature.
  assert columns['class_name'] == [r['class_name'] for r in rows]


@pytest.mark.slow
def test_npz_to_served_class_names(tmp_path):
  path = str(tmp_path / 'shapes.npz')
  make_image_folder.write_npz(path, per_class=16, size=16)
  export_dir, config = train_evaluate_export(tmp_path, f'acet,data=npz:{path},model=lenet,runlocal')
  images, _ = held_out_images(config)
  rows = predict_in_process(export_dir, images)
  assert len(rows) == len(images)
  assert_named(rows)


@pytest.mark.slow
def test_model_by_name_to_served_class_names(tmp_path):
  folder = str(tmp_path / 'shapes')
  make_image_folder.write_folder(folder, per_class=16, size=20)
  export_dir, config = train_evaluate_export(
    tmp_path,
    f'acet,data=folder:{folder},image_size=16,channels=1,'
    'model=tests.model_factories:small_cnn,runlocal',
  )
  images, _ = held_out_images(config)
  assert images.shape[1:] == (16, 16, 1)
  rows = predict_in_process(export_dir, images, signature='serving_default')
  assert_named(rows)
  with open(
    os.path.join(served_model.ServedModel(export_dir).path, 'assets', 'metadata.json')
  ) as f:
    assert json.load(f)['model'] == 'tests.model_factories:small_cnn'
