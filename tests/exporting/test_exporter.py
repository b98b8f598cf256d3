"""acet_tf.export: the SavedModel loads in a fresh process, matches Keras, abstains as stored."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from acet_tf.configs import mnist5k
from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.exporting import abstaining_classifier
from acet_tf.exporting import exporter
from tests.support import digits
from tests.support import keras_outputs


@pytest.fixture(scope='module')
def run(exported_run):
  return exported_run


# A fresh interpreter: nothing of acet_tf or Keras is imported, only TensorFlow and the SavedModel.
_FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, inputs, outputs = sys.argv[1:4]
x = np.load(inputs)
m = tf.saved_model.load(path)
result = {'signatures': sorted(m.signatures), 'stored_threshold': float(m.threshold.numpy())}
with open(m.metadata.asset_path.numpy().decode()) as f:
  result['metadata_threshold'] = json.load(f)['threshold']['value']
arrays = {}
for key, out in [('f32', m.signatures['serving_default'](images=tf.constant(x['f32']))),
                 ('u8', m.signatures['serving_uint8'](images=tf.constant(x['u8'])))]:
  for k, v in out.items():
    arrays[f'{key}/{k}'] = v.numpy()
t = float(x['t'])
m.set_threshold(tf.constant(t))
serve = m.signatures['serving_default']
arrays['set/accepted'] = serve(images=tf.constant(x['f32']))['accepted'].numpy()
arrays['explicit/accepted'] = m.signatures['with_threshold'](
    images=tf.constant(x['f32']), threshold=tf.constant(0.0))['accepted'].numpy()
result['threshold_after_set'] = float(m.threshold.numpy())
try:
  m.set_threshold(tf.constant(1.5))
  result['bad_threshold'] = 'accepted'
except tf.errors.InvalidArgumentError as e:
  result['bad_threshold'] = e.message
try:
  m.signatures['serving_default'](images=tf.constant(x['f32'] * 2))
  result['bad_images'] = 'accepted'
except tf.errors.InvalidArgumentError as e:
  result['bad_images'] = e.message
np.savez(outputs, **arrays)
print(json.dumps(result))
"""


@pytest.mark.slow
def test_fresh_process_matches_keras_and_threshold_variable_works(run, tmp_path):
  model, threshold = run['model'], run['metadata']['threshold']['value']
  images, _ = digits()
  u8 = np.round(images * 255).astype(np.uint8)
  expected = keras_outputs(model, images, threshold)
  # A threshold inside the range of the confidences, so that `accepted` has both values.
  t = float(np.median(expected['confidence']))
  np.savez(tmp_path / 'in.npz', f32=images, u8=u8, t=np.float32(t))
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      _FRESH_PROCESS,
      run['path'],
      str(tmp_path / 'in.npz'),
      str(tmp_path / 'out.npz'),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  got = np.load(tmp_path / 'out.npz')

  assert result['signatures'] == sorted(abstaining_classifier.SIGNATURES)
  assert result['stored_threshold'] == pytest.approx(threshold, abs=1e-7)
  assert result['metadata_threshold'] == threshold
  for key in ('f32', 'u8'):  # u8 holds the same pixels as f32, so Keras' answer is the same.
    np.testing.assert_allclose(got[f'{key}/probabilities'], expected['probabilities'], atol=1e-5)
    np.testing.assert_allclose(got[f'{key}/confidence'], expected['confidence'], atol=1e-5)
    np.testing.assert_array_equal(got[f'{key}/predicted_class'], expected['predicted_class'])
    assert got[f'{key}/predicted_class'].dtype == np.int32
    np.testing.assert_array_equal(
      got[f'{key}/accepted'], got[f'{key}/confidence'] >= np.float32(threshold)
    )
  # The variable changed in the loaded model, no re-export: `accepted` follows the new threshold.
  assert result['threshold_after_set'] == pytest.approx(t, abs=1e-7)
  np.testing.assert_array_equal(got['set/accepted'], got['f32/confidence'] >= np.float32(t))
  assert 0 < got['set/accepted'].sum() < len(images)
  assert got['explicit/accepted'].all()
  assert 'threshold must be in [0, 1]' in result['bad_threshold']
  assert 'images must be in [0, 1]' in result['bad_images']


@pytest.mark.slow
def test_saved_model_cli_lists_the_signatures(run):
  proc = subprocess.run(
    ['saved_model_cli', 'show', '--all', '--dir', run['path']],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for name in abstaining_classifier.SIGNATURES:
    assert f"signature_def['{name}']" in out
  for output in abstaining_classifier.OUTPUTS:
    assert f"outputs['{output}']" in out
  assert out.count('DT_UINT8') == 1  # Only serving_uint8's input.
  assert "inputs['threshold']" in out
  assert 'shape: (-1, 28, 28, 1)' in out
  assert 'Method name is: tensorflow/serving/predict' in out


@pytest.mark.slow
def test_auto_threshold_is_the_calibration_rule_and_metadata_is_complete(run):
  metadata, model = run['metadata'], run['model']
  config = mnist5k.get_config('acet,runlocal')
  n = metadata['threshold']['examples']['test']
  assert n == config.eval.max_examples
  images, labels = digits(n)
  probs = predictions_lib.make_predict_fn(model)(images).numpy()
  conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
  assert metadata['threshold']['value'] == pytest.approx(
    ood_metrics.calibrate_threshold(conf, correct, 0.95), abs=1e-6
  )
  rates = metadata['threshold']['accept_rates']
  assert rates['test_correct'] >= 0.95
  assert rates['test'] == pytest.approx(np.mean(conf >= metadata['threshold']['value']), abs=1e-9)
  assert set(rates) >= {'noise', 'adv_noise'}
  assert metadata['threshold']['examples']['adv_noise'] == config.eval.adv_noise_examples
  assert metadata['threshold']['adv_noise_attack']['steps'] == config.eval.adv_noise_steps
  assert 'keep=0.95' in metadata['threshold']['how']
  assert metadata['class_names'] == [str(k) for k in range(10)]
  assert metadata['input']['shape'] == [28, 28, 1]
  assert metadata['config']['method'] == 'acet'
  with open(os.path.join(run['workdir'], 'final_metrics.json')) as f:
    assert metadata['final_metrics'] == json.load(f)
  with open(os.path.join(run['path'], 'assets', exporter.METADATA_FILENAME)) as f:
    assert json.load(f) == json.loads(json.dumps(metadata))
  # TF Serving's layout: only the finished version directory, nothing half-written beside it.
  assert sorted(os.listdir(run['export_dir'])) == ['1']


@pytest.mark.slow
def test_demo_request_holds_each_kind(run):
  with open(run['demo']) as f:
    demo = json.load(f)
  assert demo['signature_name'] == 'serving_default'
  assert len(demo['instances']) == len(demo['descriptions']) == 9  # 3 test, noise, adv. noise.
  assert [d.split()[0] for d in demo['descriptions']] == ['test'] * 3 + ['noise'] * 3 + [
    'adv_noise'
  ] * 3
  images = np.asarray(demo['instances'], np.float32)
  assert images.shape == (9, 28, 28, 1) and images.min() >= 0 and images.max() <= 1
  test, labels = digits(3)
  np.testing.assert_array_equal(images[:3], test)
  assert demo['descriptions'][0] == f'test image, label {labels[0]}'


@pytest.mark.slow
def test_versions_and_fixed_threshold(run, tmp_path):
  export_dir = str(tmp_path / 'export')
  os.makedirs(os.path.join(export_dir, '4'))  # A version directory of someone else's.
  os.makedirs(os.path.join(export_dir, 'notes'))
  path, metadata = exporter.export_model(
    run['workdir'], export_dir, threshold='0.25', num_examples=16, adv_noise_examples=0
  )
  assert path == os.path.join(export_dir, '5')
  assert metadata['threshold']['value'] == 0.25 and metadata['threshold']['mode'] == 'fixed'
  assert 'adv_noise' not in metadata['threshold']['accept_rates']
  assert metadata['threshold']['examples'] == {'test': 16, 'noise': 16}
  with pytest.raises(FileExistsError, match='pick another --version'):
    exporter.export_model(
      run['workdir'], export_dir, version=5, threshold=0.25, num_examples=4, adv_noise_examples=0
    )


@pytest.mark.parametrize('bad', ['1.5', '-0.1', 'nan', 'high', 2])
def test_bad_threshold_is_refused(bad):
  with pytest.raises(ValueError, match="threshold must be 'auto' or a float in"):
    exporter.parse_threshold(bad)


def test_parse_threshold():
  assert exporter.parse_threshold('AUTO') == 'auto'
  assert exporter.parse_threshold('0.5') == 0.5
  assert exporter.parse_threshold(1) == 1.0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  config = mnist5k.get_config('plain,runlocal')
  (tmp_path / 'config.json').write_text(config.to_json())
  with pytest.raises(FileNotFoundError, match='train first'):
    exporter.export_model(str(tmp_path), str(tmp_path / 'export'), threshold=0.5)
