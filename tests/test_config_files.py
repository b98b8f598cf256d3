"""--config=configs/<file> finds the packaged config file from any directory, and `configs` is not
a top-level package of the install."""

import json
import os
import subprocess
import sys

import pytest

from acet_tf import config_files
from tests import support


def test_a_path_that_exists_is_read_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('configs')
  with open('configs/mnist5k.py', 'w') as f:
    f.write("# The user's own copy.\n")
  assert config_files.resolve('configs/mnist5k.py:acet') == 'configs/mnist5k.py:acet'


def test_a_missing_configs_path_falls_back_to_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  want = os.path.join(config_files.PACKAGE_CONFIGS, 'svhn.py')
  assert config_files.resolve('configs/svhn.py:acet,runlocal') == want + ':acet,runlocal'
  assert config_files.resolve('configs/svhn.py') == want
  assert config_files.resolve('./configs/svhn.py') == want
  # Not a packaged file, or not under configs/: unchanged, so the flag's own error names it.
  assert config_files.resolve('configs/nope.py:acet') == 'configs/nope.py:acet'
  assert config_files.resolve('mine/svhn.py:acet') == 'mine/svhn.py:acet'
  argv = ['train', '--config=configs/svhn.py:acet', '--config_file', 'configs/mnist.py', '--x=1']
  assert config_files.resolve_argv(argv) == [
    'train',
    f'--config={want}:acet',
    '--config_file',
    os.path.join(config_files.PACKAGE_CONFIGS, 'mnist.py'),
    '--x=1',
  ]
  assert config_files.display_name(want) == 'configs/svhn.py'


def test_the_clone_link_and_the_package_hold_the_same_files():
  linked = os.path.join(support.ROOT, 'configs')
  assert os.path.realpath(linked) == os.path.realpath(config_files.PACKAGE_CONFIGS)


@pytest.mark.slow
def test_train_runs_from_a_directory_without_configs(tmp_path):
  # The installed package only (`pip install -e .` as CI does, or a wheel); not the clone's root.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  run = lambda code: subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  if run('import acet_tf').returncode != 0:
    pytest.skip('acet_tf is not installed (pip install -e . installs it)')
  probe = run('import configs')
  assert probe.returncode != 0 and "No module named 'configs'" in probe.stderr
  cmd = [
    sys.executable,
    '-m',
    'acet_tf.train',
    '--config=configs/mnist5k.py:plain,runlocal',
    '--config.strategy=one_device',
    '--workdir=run',
  ]
  result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'run' / 'final_metrics.json') as f:
    assert json.load(f)['step'] == 6
