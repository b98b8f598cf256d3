"""The package's layering (pyproject.toml's import-linter contracts) holds, and breaks when a
forbidden import is added: run on a copy of the package so the check itself is what is tested."""

import os
import shutil
import subprocess
import sys

import pytest

from tests import support


def _copy_project(root):
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for name in ('acet_tf', 'tools'):
    shutil.copytree(os.path.join(support.ROOT, name), os.path.join(root, name), ignore=ignore)
  shutil.copy(os.path.join(support.ROOT, 'pyproject.toml'), root)


def _lint(root):
  lint = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  if not os.path.exists(lint):
    pytest.skip('import-linter is not installed (requirements.txt installs it)')
  env = dict(os.environ, PYTHONPATH=str(root))
  return subprocess.run(
    [lint, '--no-cache'], cwd=root, env=env, capture_output=True, text=True, timeout=120
  )


def _add_import(root, module, statement):
  with open(os.path.join(root, *module.split('.')) + '.py', 'a') as f:
    f.write(f'\n{statement}  # noqa\n')


@pytest.mark.parametrize(
  'module, statement, contract',
  [
    ('acet_tf.evaluation.ood_metrics', 'from acet_tf.training import trainer', 'layers'),
    ('acet_tf.ops.losses', 'from acet_tf.models import lenet', 'layers'),  # Siblings.
    ('acet_tf.serving.codec', 'from acet_tf.evaluation import ood_metrics', 'serving'),
    ('acet_tf.serving.codec', 'from acet_tf.artifacts import runs', 'serving'),
    ('acet_tf.data.custom_data', 'import tools.figures', 'the package never imports tools/'),
    ('acet_tf.training.trainer', 'from acet_tf.configs import common', 'layers'),
    ('acet_tf.keras.outlier_aware_model', 'from acet_tf.configs import common', 'layers'),
    ('acet_tf.exporting.exporter', 'from acet_tf.keras import outlier_aware_model', 'layers'),
    ('acet_tf.robustness.attack_spec', 'from acet_tf.ops import pgd', 'settings'),
  ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, statement, contract):
  _copy_project(tmp_path)
  _add_import(tmp_path, module, statement)
  result = _lint(tmp_path)
  assert result.returncode != 0, result.stdout
  broken = result.stdout[result.stdout.index('Broken contracts') :]
  name = {
    'layers': "acet_tf's layers",
    'serving': 'serving loads and runs an export',
    'settings': 'evaluation settings name attacks as data',
  }
  assert name.get(contract, contract) in broken, result.stdout


def test_the_package_keeps_its_contracts(tmp_path):
  _copy_project(tmp_path)
  result = _lint(tmp_path)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'Contracts: 4 kept, 0 broken.' in result.stdout
