"""Faults: SIGTERM, kill -9, a NaN in the data, unreadable data, data that does not fit the model.

Every interrupted run is compared with one uninterrupted run of the same config: a resumed run
must end with the same weights and optimizer state (so the same data position and learning rate).
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.configs import mnist5k
from acet_tf.data import input_pipeline
from acet_tf.training import distribution
from acet_tf.training import trainer
from tests import support

# Subprocesses, servers and whole training runs: the slow tier.
pytestmark = pytest.mark.slow

ROOT = support.ROOT
# 12 steps of LeNet on mnist5k; the learning rate drops at steps 6, 9 and 10.
OVERRIDES = {
  'strategy': 'one_device',
  'num_train_steps': 12,
  'checkpoint_every_steps': 4,
  'log_every_steps': 4,
  'eval.every_steps': 1000,
  'eval.max_examples': 16,
  'eval.adv_noise_examples': 8,
  'eval.adv_noise_steps': 1,
}
ARG = 'plain,runlocal'
FLAGS = [f'--config=configs/mnist5k.py:{ARG}'] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]


def _config():
  config = mnist5k.get_config(ARG)
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _state(path):
  """{name: value} of every variable in checkpoint `path` but the save bookkeeping."""
  reader = tf.train.load_checkpoint(path)
  return {
    name: reader.get_tensor(name)
    for name in reader.get_variable_to_shape_map()
    if not name.startswith(('save_counter', 'checkpointed_runs', '_CHECKPOINTABLE'))
  }


def _assert_same_state(path, reference_path, atol):
  got, want = _state(path), _state(reference_path)
  assert sorted(got) == sorted(want)
  assert any(n.startswith('optimizer/_variables') for n in want)  # Adam's moments are compared.
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


def _latest(workdir):
  return tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The checkpoint directory of one uninterrupted run (keeps ckpt-4, 8 and 12)."""
  workdir = tmp_path_factory.mktemp('reference')
  final = trainer.train_and_evaluate(_config(), str(workdir))
  assert final['step'] == 12
  return os.path.join(workdir, 'checkpoints')


def _at_step(step, action):
  """A trainer hook that calls `action()` once the train call ending at `step` returns."""

  def hook(current, context):
    del context
    if current == step:
      action()

  return hook


# ----------------------------------------------------------------------------------------------
# Preemption and crashes.
# ----------------------------------------------------------------------------------------------


def test_sigterm_saves_then_the_rerun_ends_like_an_uninterrupted_run(
  tmp_path, monkeypatch, reference
):
  # On two replicas, through the whole trainer; the reference ran on one device.
  create = distribution.create_strategy
  monkeypatch.setattr(
    trainer.distribution,
    'create_strategy',
    lambda name, tpu_address: create(
      name, tpu_address, cross_device_ops=tf.distribute.ReductionToOneDevice()
    ),
  )
  config = _config()
  config.strategy = 'mirrored'
  handler_before = signal.getsignal(signal.SIGTERM)
  sigterm = _at_step(5, lambda: os.kill(os.getpid(), signal.SIGTERM))
  with pytest.raises(SystemExit) as stopped:
    trainer.train_and_evaluate(config, str(tmp_path), hooks=[sigterm])
  assert stopped.value.code == distribution.EXIT_PREEMPTED == 143
  assert signal.getsignal(signal.SIGTERM) == handler_before  # The trainer's handler is gone.
  # Saved at step 5, between the periodic checkpoints 4 and 8.
  assert _latest(tmp_path).endswith('ckpt-5')
  assert not (tmp_path / 'final_metrics.json').exists()

  steps_run = []
  final = trainer.train_and_evaluate(
    config, str(tmp_path), hooks=[lambda step, _: steps_run.append(step)]
  )
  assert steps_run == list(range(6, 13)) and final['step'] == 12
  # Adam after 12 steps on 2 replicas vs 1 device: only the summation order differs.
  _assert_same_state(_latest(tmp_path), os.path.join(reference, 'ckpt-12'), atol=1e-5)


# Runs acet_tf.train's main and kills its own process with SIGKILL (kill -9: no handler, no
# cleanup) right after step 7, between the checkpoints of steps 4 and 8.
_KILLED_AFTER_STEP_7 = """
import functools, os, signal
from absl import app
from acet_tf import train
def kill_at_7(step, context):
  if step == 7:
    os.kill(os.getpid(), signal.SIGKILL)
app.run(functools.partial(train.main, hooks=[kill_at_7]))
"""


def test_kill_9_then_the_same_command_resumes_from_the_last_checkpoint(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  killed = subprocess.run(
    [sys.executable, '-c', _KILLED_AFTER_STEP_7, *FLAGS, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert _latest(workdir).endswith('ckpt-4')

  rerun = subprocess.run(
    [sys.executable, '-m', 'acet_tf.train', *FLAGS, f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert re.search(r'Resumed from .*ckpt-4\b', rerun.stderr)
  assert 'steps 4 -> 12' in rerun.stderr  # Steps 5-7 are lost and run again.
  assert _latest(workdir).endswith('ckpt-12')
  # Same device, same order of operations as the reference: the same numbers.
  _assert_same_state(_latest(workdir), os.path.join(reference, 'ckpt-12'), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad math, bad data.
# ----------------------------------------------------------------------------------------------


def test_nan_in_the_data_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
  tmp_path, monkeypatch, reference
):
  stream = input_pipeline.train_dataset

  def poisoned(config, info, *, start_step=0, input_context=None):
    """The real stream with one NaN pixel in the batch of step 5 (max-pool can hide it)."""

    def poison(index, batch):
      images, labels = batch
      nan = tf.tensor_scatter_nd_update(images, [[0, 14, 14, 0]], [float('nan')])
      return tf.where(index + start_step == 5, nan, images), labels

    ds = stream(config, info, start_step=start_step, input_context=input_context)
    return ds.enumerate().map(poison)

  monkeypatch.setattr(trainer.input_pipeline, 'train_dataset', poisoned)
  with pytest.raises(FloatingPointError, match=r'at step 5;.*last good checkpoint is .*ckpt-4'):
    trainer.train_and_evaluate(_config(), str(tmp_path))
  assert _latest(tmp_path).endswith('ckpt-4')
  assert not (tmp_path / 'final_metrics.json').exists()
  # The kept checkpoint is the good state of step 4, not touched by the NaN.
  _assert_same_state(_latest(tmp_path), os.path.join(reference, 'ckpt-4'), atol=1e-6)


def test_images_of_another_shape_are_rejected_before_training(tmp_path, monkeypatch):
  get_info = input_pipeline.get_info
  monkeypatch.setattr(
    trainer.input_pipeline,
    'get_info',
    lambda name, data_dir=None, options=None: dataclasses.replace(
      get_info(name, data_dir, options), image_shape=(32, 32, 1)
    ),
  )
  steps_run = []
  with pytest.raises(
    ValueError,
    match=r"dataset 'mnist5k' split 'test' has images of shape "
    r'\(28, 28, 1\), expected \(32, 32, 1\)',
  ):
    trainer.train_and_evaluate(
      _config(), str(tmp_path), hooks=[lambda step, _: steps_run.append(step)]
    )
  assert steps_run == [] and not os.listdir(tmp_path)


def test_a_model_or_checkpoint_for_other_images_is_rejected(reference):
  config = _config()
  info = input_pipeline.get_info('mnist5k')
  model, _, _ = trainer.build_model_and_optimizer(
    config, dataclasses.replace(info, image_shape=(32, 32, 3)), 12, tf.distribute.get_strategy()
  )
  with pytest.raises(
    ValueError,
    match=r'Dataset mnist5k has images of shape \(28, 28, 1\) but '
    r'model lenet takes \(32, 32, 3\)',
  ):
    trainer.check_model_fits_data(config, info, model)
  # A workdir trained on 28x28 images does not restore into a model for 32x32 ones.
  other = dataclasses.replace(info, image_shape=(32, 32, 1))
  _, _, checkpoint = trainer.build_model_and_optimizer(
    config, other, 12, tf.distribute.get_strategy()
  )
  with pytest.raises(
    ValueError,
    match=r'ckpt-4 does not fit model lenet for dataset mnist5k '
    r'\(images \(32, 32, 1\), 10 classes\)',
  ):
    runs.restore_checkpoint(checkpoint, os.path.join(reference, 'ckpt-4'), config, other)


def test_unreadable_dataset_is_rejected_before_training_naming_it(tmp_path, monkeypatch):
  corrupt = tmp_path / 'corrupt.tfrecord'
  corrupt.write_bytes(b'this is not a TFRecord file' * 100)

  def load_corrupt(name, split, data_dir, options=None):
    del name, split, data_dir, options
    return tf.data.TFRecordDataset(str(corrupt)).map(
      lambda record: (
        tf.reshape(tf.io.decode_raw(record, tf.uint8)[:784], [28, 28, 1]),
        tf.constant(0),
      )
    )

  monkeypatch.setattr(input_pipeline, '_load_uint8', load_corrupt)
  steps_run = []
  workdir = tmp_path / 'run'
  with pytest.raises(
    input_pipeline.DatasetUnavailableError,
    match=r"dataset 'mnist5k' split 'test' cannot be read: DataLossError",
  ):
    trainer.train_and_evaluate(
      _config(), str(workdir), hooks=[lambda step, _: steps_run.append(step)]
    )
  assert steps_run == [] and not workdir.exists()
  # The train split is read in full before the first step as well.
  with pytest.raises(
    input_pipeline.DatasetUnavailableError, match=r"dataset 'mnist5k' split 'train' cannot be read"
  ):
    input_pipeline.train_dataset(_config(), input_pipeline.get_info('mnist5k'))
