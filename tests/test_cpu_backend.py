"""acet_tf chooses TensorFlow's CPU kernels before TensorFlow is imported; a user's choice wins."""

import os
import subprocess
import sys

import pytest

from acet_tf import cpu_backend

VAR = cpu_backend.ONEDNN_VAR
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sets_onednn_on_x86_64_when_unset():
  environ = {}
  assert cpu_backend.configure(environ, modules={}, machine='x86_64') == 'set'
  assert environ == {VAR: '1'}


@pytest.mark.parametrize('value', ['0', '1', 'false'])
def test_keeps_the_users_value(value):
  environ = {VAR: value}
  assert cpu_backend.configure(environ, modules={}, machine='x86_64') == 'user'
  assert environ == {VAR: value}


def test_leaves_other_machines_to_tensorflow():
  environ = {}
  assert cpu_backend.configure(environ, modules={}, machine='aarch64') == 'not_x86_64'
  assert environ == {}


def test_too_late_after_tensorflow_warns_where_onednn_is_off(monkeypatch):
  environ = {}
  monkeypatch.setattr(cpu_backend, 'onednn_enabled', lambda: False)
  with pytest.warns(UserWarning, match=f'{VAR}=1'):
    assert cpu_backend.configure(environ, {'tensorflow': None}, 'x86_64') == 'too_late'
  assert environ == {}  # Setting it now would change nothing and mislead.
  monkeypatch.setattr(cpu_backend, 'onednn_enabled', lambda: True)
  assert cpu_backend.configure(environ, {'tensorflow': None}, 'x86_64') == 'too_late'


def test_cpu_description_names_model_and_extensions():
  if not os.path.exists('/proc/cpuinfo'):
    pytest.skip('no /proc/cpuinfo')
  assert cpu_backend.cpu_model()
  extensions = cpu_backend.vector_extensions()
  assert set(extensions) <= set(cpu_backend.VECTOR_EXTENSIONS.values())
  # Every x86-64 CPU that runs TensorFlow's wheels has AVX; AVX2 is on all but the oldest.
  with open('/proc/cpuinfo') as f:
    has_avx2 = ' avx2' in f.read()
  assert ('AVX2' in extensions) == has_avx2


def _onednn_state_after(module, env_value):
  """(the variable, TF's oneDNN state) in a fresh process that imports `module` first."""
  env = {k: v for k, v in os.environ.items() if k != VAR}
  if env_value is not None:
    env[VAR] = env_value
  code = (
    f'import os, {module}\n'
    'from tensorflow.python.util import _pywrap_util_port as p\n'
    f'print(os.environ.get({VAR!r}), p.IsMklEnabled())\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  )
  return out.stdout.split()


@pytest.mark.slow
@pytest.mark.skipif(not cpu_backend.on_x86_64(), reason='x86-64 only')
@pytest.mark.parametrize('module', ['acet_tf.train', 'acet_tf.evaluate', 'tools.benchmark'])
def test_binaries_turn_onednn_on_unless_the_user_said_otherwise(module):
  assert _onednn_state_after(module, None) == ['1', 'True']
  assert _onednn_state_after(module, '0') == ['0', 'False']


def test_this_test_process_runs_the_intended_kernels():
  # conftest.py imports acet_tf before TensorFlow, as the binaries do.
  want = os.environ.get(VAR) not in ('0', 'false', 'False')
  if cpu_backend.on_x86_64():
    assert cpu_backend.onednn_enabled() == want


@pytest.mark.parametrize(
  'onednn,extensions,cap,want',
  [
    (False, ['AVX2', 'AVX-512F'], None, 'eigen'),
    (True, ['AVX2', 'FMA', 'AVX-512F', 'AVX512_VNNI'], None, 'onednn_avx512'),
    (True, ['AVX2', 'FMA', 'AVX-512F'], 'AVX2', 'onednn_avx2'),
    (True, ['AVX2', 'FMA', 'AVX-512F'], 'avx512_core_bf16', 'onednn_avx512'),
    (True, ['AVX2', 'FMA'], None, 'onednn_avx2'),
    (True, ['AVX2', 'FMA'], 'AVX', 'onednn'),
    (True, [], None, 'onednn'),
  ],
)
def test_kernel_library_follows_onednn_the_cpu_and_the_isa_cap(
  monkeypatch, onednn, extensions, cap, want
):
  monkeypatch.setattr(cpu_backend, 'onednn_enabled', lambda: onednn)
  monkeypatch.setattr(cpu_backend, 'vector_extensions', lambda: extensions)
  if cap is None:
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
  else:
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', cap)
  assert cpu_backend.kernel_library() == want


def test_pgd_cpu_pass_workarounds_only_on_the_kernels_they_were_measured_on(monkeypatch):
  from acet_tf.ops import pgd  # noqa: PLC0415 (imports TensorFlow)

  every = set(pgd.CPU_PASS_FEATURES)
  for library, want in [
    ('onednn_avx512', every),
    ('onednn_avx2', every),
    ('eigen', set()),
    ('onednn', set()),  # Not measured: the plain tape.
  ]:
    monkeypatch.setattr(cpu_backend, 'kernel_library', lambda library=library: library)
    assert set(pgd.cpu_pass_features()) == want, library
  pgd.force_cpu_pass(['conv'])
  try:
    assert set(pgd.cpu_pass_features()) == {'conv'}
  finally:
    pgd.force_cpu_pass(None)
  with pytest.raises(ValueError, match='unknown PGD pass features'):
    pgd.force_cpu_pass(['fast'])
