"""Distributed training: 2 replicas equal one device; 2 worker processes agree and survive SIGTERM.

Both run in fresh processes: MirroredStrategy and MultiWorkerMirroredStrategy as users get them
(TF's default collective ops), without sharing this process's collectives with other tests.
"""

import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models
from acet_tf.configs import mnist5k
from acet_tf.data import input_pipeline
from acet_tf.training import distribution
from acet_tf.training import train_step
from acet_tf.training import trainer
from tests import support

# Subprocesses, servers and whole training runs: the slow tier.
pytestmark = pytest.mark.slow

ROOT = support.ROOT


# ----------------------------------------------------------------------------------------------
# MirroredStrategy over 2 logical CPUs vs one device.
# ----------------------------------------------------------------------------------------------

# (method, model, dtype, tolerance on every weight after 3 steps). LeNet in float32 as in training:
# only the order of the sums differs (~1e-7 relative per step; Adam makes that ~1e-6 absolute
# after 3 steps). The ResNet in float64: in float32 its synchronized BatchNorm (variance =
# E[x^2] - E[x]^2) makes even one-device gradients differ by ~0.5% from float64 ones on a batch
# this small, and two replicas differ by as much; in float64 the two agree to ~1e-13 (plain) and
# ~1e-8 (acet), so the tolerance can be tight.
CASES = [
  ('plain', 'lenet', 'float32', 1e-5),
  ('acet', 'lenet', 'float32', 1e-5),
  ('plain', 'preact_resnet', 'float64', 1e-6),
  ('acet', 'preact_resnet', 'float64', 1e-6),
]


def _three_steps(config, strategy, init):
  """Weights after 3 steps of the real model, optimizer, step and input stream on `strategy`."""
  info = input_pipeline.get_info(config.dataset)
  model, optimizer, _ = trainer.build_model_and_optimizer(config, info, 100, strategy)
  model.set_weights(init)
  steps = train_step.make_train_function(model, optimizer, config, strategy)
  _, bad_step = steps(trainer.train_iterator(config, info, strategy, 0), tf.constant(3))
  assert int(bad_step) == -1 and int(optimizer.iterations.numpy()) == 3
  return model.get_weights()


def replica_equivalence(out_path):
  """Runs CASES on one device and on 2 replicas; writes {case: max |difference|} as JSON.

  Runs in a fresh process (see the fixture): one MirroredStrategy with TF's default collective
  ops serves all cases (two such strategies in one process can collide, tensorflow#62790).
  """
  cpus = tf.config.list_physical_devices('CPU')
  tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  one = distribution.create_strategy('one_device')
  two = distribution.create_strategy('mirrored')
  assert two.num_replicas_in_sync == 2
  results = {}
  for method, model_name, dtype, _ in CASES:
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)
    config = mnist5k.get_config(f'{method},runlocal')
    config.model = model_name
    config.batch_size = 8  # 4 clean + 4 noise images per replica.
    keras.utils.set_random_seed(0)
    info = input_pipeline.get_info(config.dataset)
    init = models.create_model(model_name, info.image_shape, info.num_classes).get_weights()
    w_one = _three_steps(config, one, init)
    w_two = _three_steps(config, two, init)
    results[f'{method}-{model_name}'] = {
      'dtype': str(w_one[0].dtype),
      # Every variable moved (so equality is not trivial), BatchNorm's moving statistics too.
      'min_moved': min(float(np.abs(a - b).max()) for a, b in zip(w_one, init)),
      'max_difference': max(float(np.abs(a - b).max()) for a, b in zip(w_one, w_two)),
    }
  with open(out_path, 'w') as f:
    json.dump(results, f)


@pytest.fixture(scope='module')
def equivalence(tmp_path_factory):
  out = tmp_path_factory.mktemp('equivalence') / 'results.json'
  result = subprocess.run(
    [
      sys.executable,
      '-c',
      'import sys; from tests.training import test_distributed as t; '
      't.replica_equivalence(sys.argv[1])',
      str(out),
    ],
    cwd=ROOT,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize('method, model_name, dtype, atol', CASES)
def test_two_replicas_train_like_one_device(equivalence, method, model_name, dtype, atol):
  case = equivalence[f'{method}-{model_name}']
  assert case['dtype'] == dtype
  assert case['min_moved'] > 20 * atol
  assert case['max_difference'] <= atol


# ----------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.
# ----------------------------------------------------------------------------------------------

# Runs acet_tf.train's main; saves the final weights to $TEST_WEIGHTS; with $TEST_SIGTERM_AFTER
# set, sends itself SIGTERM once that many steps ran (a preemption notice at a known step).
_WORKER = """
import functools, os, signal
import numpy as np
from absl import app
from acet_tf import train

sigterm_after = int(os.environ.get('TEST_SIGTERM_AFTER', -1))
def test_hook(step, context):
  if step == sigterm_after:
    os.kill(os.getpid(), signal.SIGTERM)
  if step == context.total_steps:
    np.savez(os.environ['TEST_WEIGHTS'], *context.model.get_weights())
app.run(functools.partial(train.main, hooks=[test_hook]))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_workers(workdir, tmp_path, name, sigterm_after=None):
  """Runs 2 workers to their end; returns [(returncode, log text, pid)], worker 0 (chief) first."""
  ports = [_free_port(), _free_port()]
  closed_port = _free_port()  # Nothing listens: TF's GCP probe fails at once, locally.
  scratch = tmp_path / 'worker_tmp'
  scratch.mkdir(exist_ok=True)
  flags = [
    '--config=configs/mnist5k.py:plain,runlocal',
    '--config.strategy=multi_worker',
    '--config.num_train_steps=10',
    '--config.checkpoint_every_steps=5',
    '--config.eval.every_steps=1000',
    '--config.eval.max_examples=16',
    '--config.eval.adv_noise_examples=8',
    '--config.eval.adv_noise_steps=1',
    f'--workdir={workdir}',
  ]
  procs, logs = [], []
  for index in range(2):
    env = dict(
      os.environ,
      TF_CPP_MIN_LOG_LEVEL='2',
      TMPDIR=str(scratch),
      GCE_METADATA_IP=f'127.0.0.1:{closed_port}',
      NO_PROXY='127.0.0.1,localhost',
      TF_CONFIG=json.dumps(
        {
          'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
          'task': {'type': 'worker', 'index': index},
        }
      ),
      TEST_WEIGHTS=str(tmp_path / f'{name}_worker{index}.npz'),
      TEST_SIGTERM_AFTER=str(sigterm_after if sigterm_after and index == 1 else -1),
    )
    logs.append(tmp_path / f'{name}_worker{index}.log')
    with open(logs[-1], 'w') as log:
      procs.append(
        subprocess.Popen(
          [sys.executable, '-c', _WORKER] + flags,
          cwd=ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, log.read_text(), p.pid) for p, log in zip(procs, logs)]


def _summary_writer_pids(workdir):
  """Pids in the TensorBoard event file names (events.out.tfevents.<time>.<host>.<pid>.<n>.v2)."""
  names = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  return {int(re.search(r'\.(\d+)\.\d+\.v2$', f).group(1)) for f in names}


def test_two_workers_survive_a_sigterm_and_finish_with_identical_weights(tmp_path):
  workdir = tmp_path / 'run'
  # Round 1: worker 1 gets SIGTERM after step 6. Both save at the same step and exit with 143.
  first = _run_workers(workdir, tmp_path, 'first', sigterm_after=6)
  for code, log, _ in first:
    assert code == distribution.EXIT_PREEMPTED, log[-3000:]
    assert 'Preempted: checkpoint saved' in log
  # The handler agrees on a step, then all run one more train call (of 1 step) and save.
  assert tf.train.latest_checkpoint(str(workdir / 'checkpoints')).endswith('ckpt-7')

  # Round 2: the same command resumes both at step 7 and ends at exactly 10.
  second = _run_workers(workdir, tmp_path, 'second')
  for code, log, _ in second:
    assert code == 0, log[-3000:]
    assert re.search(r'Resumed from .*ckpt-7\b', log)
    assert 'steps 7 -> 10' in log
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 10
  reader = tf.train.load_checkpoint(str(workdir / 'checkpoints'))
  assert reader.get_tensor('optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE') == 10

  w0, w1 = (np.load(tmp_path / f'second_worker{i}.npz') for i in range(2))
  assert len(w0.files) == len(w1.files) > 0
  for key in w0.files:
    np.testing.assert_array_equal(w0[key], w1[key])  # All-reduced: bit-identical.

  # Only the chief (worker 0) wrote summaries; no worker left scratch checkpoints behind.
  assert _summary_writer_pids(workdir) == {first[0][2], second[0][2]}
  assert not [f for f in os.listdir(tmp_path / 'worker_tmp') if f.startswith('acet_tf_worker')]
  assert {f for f in os.listdir(workdir) if not f.startswith('events')} == {
    'checkpoints',
    'config.json',
    'final_metrics.json',
  }
