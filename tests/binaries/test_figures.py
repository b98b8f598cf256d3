"""tools/figures.py: noise and adversarial noise rows for models restored from workdirs."""

import os

import numpy as np
import pytest
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.configs import mnist5k
from acet_tf.data import input_pipeline
from acet_tf.training import trainer
from tools import figures

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
EPS = 0.3


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir as train_and_evaluate leaves it (config.json, checkpoints/) of an untrained LeNet."""
  path = str(tmp_path_factory.mktemp('run'))
  config = mnist5k.get_config('plain,runlocal')
  info = input_pipeline.get_info(config.dataset)
  tf.keras.utils.set_random_seed(0)
  _, _, checkpoint = trainer.build_model_and_optimizer(
    config, info, config.num_train_steps, tf.distribute.get_strategy()
  )
  tf.train.CheckpointManager(checkpoint, os.path.join(path, 'checkpoints'), max_to_keep=1).save(
    checkpoint_number=0
  )
  runs.write_config(path, config)
  return path


@pytest.fixture(scope='module')
def result(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('fig') / 'sub' / 'adv.png')
  # The same run twice: two rows, which must agree (one seed, one noise batch).
  return figures.make_figure(
    [workdir, workdir], out, num_images=4, eps=EPS, step_size=0.05, steps=6
  )


def test_writes_a_png(result):
  with open(result['path'], 'rb') as f:
    data = f.read()
  assert data.startswith(PNG_MAGIC)
  assert len(data) > 5000


def test_noise_is_the_evaluation_noise_of_the_test_set(result, workdir):
  config = mnist5k.get_config('plain,runlocal')
  noise, _ = figures.noise_images(config, 4)
  np.testing.assert_array_equal(result['noise'], noise.numpy())
  assert result['noise'].shape == (4, 28, 28, 1)
  assert result['noise'].min() >= 0.0 and result['noise'].max() <= 1.0
  # Low-passed and rescaled per image: each spans [0, 1].
  np.testing.assert_allclose(result['noise'].max(axis=(1, 2, 3)), 1.0, atol=1e-6)
  np.testing.assert_allclose(result['noise'].min(axis=(1, 2, 3)), 0.0, atol=1e-6)


def test_adversarial_noise_stays_in_the_ball_and_raises_confidence(result):
  noise = result['noise']
  assert len(result['rows']) == 2
  for row in result['rows']:
    adv = row.adversarial
    assert adv.shape == noise.shape
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert np.abs(adv - noise).max() <= EPS + 1e-6
    assert np.abs(adv - noise).max() > 0.01  # PGD moved.
    # PGD keeps the best iterate, the start included: never less confident than the noise.
    assert np.all(row.adversarial_pred.confidence >= row.noise.confidence - 1e-5)
    assert row.adversarial_pred.confidence.mean() > row.noise.confidence.mean() + 0.01
    assert row.method == 'plain'
  a, b = result['rows']
  np.testing.assert_array_equal(a.adversarial, b.adversarial)
  summary = result['summary'][a.label]
  assert summary['adv_noise_mmc'] == pytest.approx(a.adversarial_pred.confidence.mean())


def test_bad_arguments_are_refused(workdir, tmp_path):
  with pytest.raises(ValueError, match='at least one workdir'):
    figures.make_figure([], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='num_images'):
    figures.make_figure([workdir], str(tmp_path / 'x.png'), num_images=0)
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    figures.make_figure([str(tmp_path)], str(tmp_path / 'x.png'))
