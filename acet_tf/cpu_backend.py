"""TensorFlow's CPU kernel library, chosen before TensorFlow is imported, and what the CPU is.

TensorFlow's x86-64 Linux wheels carry two sets of CPU kernels: oneDNN's and Eigen's. They run
oneDNN's by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX
(`DefaultOneDnnPolicy` in tensorflow/core/util/port.cc, TF 2.21); on every other x86-64 CPU, AVX2
machines such as AMD EPYC Zen 2/3 or Intel before Cascade Lake among them, they run Eigen's, and
acet_tf's train steps run 2-3x slower there than with oneDNN (BUILD.md, "Performance"). TensorFlow
reads the choice, the environment variable TF_ENABLE_ONEDNN_OPTS, once, when it is imported.

`configure()` runs from `acet_tf/__init__.py`, so every binary (`python -m acet_tf.train`, ...),
`tools/` and the tests set the variable before their first `import tensorflow`. A value the user
set is never changed (`TF_ENABLE_ONEDNN_OPTS=0` still gives Eigen). A program that imports
TensorFlow before acet_tf gets TensorFlow's own default and a warning saying how to change it.

This module must not import TensorFlow at module level: importing it is what must come after.
"""

import functools
import os
import platform
import sys
import warnings

ONEDNN_VAR = 'TF_ENABLE_ONEDNN_OPTS'

# Machines whose TensorFlow wheels are built with oneDNN and default it off on some CPUs.
_X86_64 = ('x86_64', 'amd64')

# /proc/cpuinfo flag -> the name printed with benchmark figures.
VECTOR_EXTENSIONS = {
  'avx2': 'AVX2',
  'fma': 'FMA',
  'avx512f': 'AVX-512F',
  'avx512_vnni': 'AVX512_VNNI',
  'avx512_bf16': 'AVX512_BF16',
  'avx_vnni': 'AVX_VNNI',
  'amx_tile': 'AMX',
}


def configure(environ=None, modules=None, machine=None):
  """Sets TF_ENABLE_ONEDNN_OPTS=1 on x86-64 unless the user set it or TensorFlow is loaded.

  Args (for tests; default to the process's own): environ, a mutable mapping of environment
  variables; modules, the names of imported modules; machine, `platform.machine()`.

  Returns what was decided, one of 'set', 'user' (the user's value is kept), 'not_x86_64' (left to
  TensorFlow), 'too_late' (TensorFlow was imported first; a warning says what to do).
  """
  environ = os.environ if environ is None else environ
  modules = sys.modules if modules is None else modules
  if ONEDNN_VAR in environ:
    return 'user'
  if not on_x86_64(machine):
    return 'not_x86_64'
  if 'tensorflow' in modules:
    if not onednn_enabled():
      warnings.warn(
        'acet_tf: TensorFlow was imported before acet_tf and runs its Eigen CPU kernels on this '
        f'CPU, 2-3x slower for acet_tf than oneDNN: set {ONEDNN_VAR}=1 in the environment, or '
        'import acet_tf before tensorflow.',
        stacklevel=3,
      )
    return 'too_late'
  environ[ONEDNN_VAR] = '1'
  return 'set'


def on_x86_64(machine=None):
  """Whether `machine` (default: this one's `platform.machine()`) is x86-64."""
  return (platform.machine() if machine is None else machine).lower() in _X86_64


def onednn_enabled():
  """Whether the loaded TensorFlow runs oneDNN's CPU kernels (imports TensorFlow)."""
  from tensorflow.python.util import _pywrap_util_port  # noqa: PLC0415 (after configure())

  return bool(_pywrap_util_port.IsMklEnabled())


# ONEDNN_MAX_CPU_ISA values (oneDNN's dispatcher control) that still allow its AVX-512 kernels.
_AVX512_ISA_CAPS = ('ALL', 'DEFAULT', 'AVX512', 'AVX10')


def kernel_library():
  """The CPU kernels TensorFlow runs: 'onednn_avx512', 'onednn_avx2', 'onednn' or 'eigen'.

  oneDNN picks its kernels from the CPU's instructions at run time, up to the cap
  ONEDNN_MAX_CPU_ISA where that is set; they are what acet_tf's CPU workarounds were measured
  against (attacks.cpu_pass_features). Imports TensorFlow.
  """
  if not onednn_enabled():
    return 'eigen'
  extensions = vector_extensions()
  cap = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
  if 'AVX-512F' in extensions and cap.startswith(_AVX512_ISA_CAPS):
    return 'onednn_avx512'
  if 'AVX2' in extensions and cap.startswith((*_AVX512_ISA_CAPS, 'AVX2')):
    return 'onednn_avx2'
  return 'onednn'


def cpu_model():
  """The CPU's model name with its family and model numbers, e.g. 'AMD EPYC (family 25 model 17)'.

  Under a hypervisor the name alone can hide the generation (KVM shows 'AMD EPYC'); the numbers
  tell it (family 25 is Zen 3 and Zen 4). Off Linux, platform.processor().
  """
  name = _cpuinfo_field('model name')
  if name is None:
    return platform.processor() or platform.machine()
  family, model = _cpuinfo_field('cpu family'), _cpuinfo_field('model')
  return f'{name} (family {family} model {model})' if family and model else name


def vector_extensions():
  """The CPU's vector extensions that select TensorFlow's kernels, e.g. ['AVX2', 'FMA']."""
  flags = set((_cpuinfo_field('flags') or '').split())
  return [name for flag, name in VECTOR_EXTENSIONS.items() if flag in flags]


def _cpuinfo_field(name):
  """The value of `name` for the first CPU in /proc/cpuinfo, or None (absent, or not Linux)."""
  return _first_cpuinfo().get(name)


@functools.cache
def _first_cpuinfo():
  """The fields of the first CPU in /proc/cpuinfo, read once; {} where there is no such file."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break  # The end of the first CPU's block.
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return {}
  return fields
