"""Test setup: two logical CPU devices (made before any tensor exists, for the distributed tests)
and the session's shared runs, trained once and reused by every test module that needs them."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# acet_tf first: it chooses TensorFlow's CPU kernels before TensorFlow is imported (cpu_backend).
import acet_tf  # noqa: E402, F401, I001
import pytest  # noqa: E402 (TF must see the environment variables first)
import tensorflow as tf  # noqa: E402

from acet_tf.ops import pgd  # noqa: E402
from acet_tf.exporting import exporter  # noqa: E402
from acet_tf.artifacts import runs  # noqa: E402
from acet_tf.training import trainer  # noqa: E402
from acet_tf.configs import mnist5k  # noqa: E402
from tests import support  # noqa: E402

_cpus = tf.config.list_physical_devices('CPU')
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(scope='session')
def plain_run(tmp_path_factory):
  """Workdir of a tiny trained mnist5k run (6 steps of plain LeNet, only the final evaluation)."""
  workdir = str(tmp_path_factory.mktemp('plain_run'))
  config = mnist5k.get_config('plain,runlocal')
  config.strategy = 'one_device'
  config.eval.every_steps = 1000
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='session')
def exported_run(tmp_path_factory):
  """A runlocal mnist5k ACET run and its export (version 1, auto threshold, a demo request).

  Returns {'workdir', 'export_dir', 'path' (version 1), 'metadata', 'demo', 'model'}.
  """
  base = tmp_path_factory.mktemp('export_run')
  config = mnist5k.get_config('acet,runlocal')
  config.strategy = 'one_device'
  workdir, export_dir = str(base / 'run'), str(base / 'export')
  trainer.train_and_evaluate(config, workdir)
  path, metadata = exporter.export_model(
    workdir,
    export_dir,
    threshold='auto',
    demo_request_path=str(base / 'demo.json'),
    demo_examples=3,
  )
  model, _, _, _ = runs.restore_model(workdir)
  return dict(
    workdir=workdir,
    export_dir=export_dir,
    path=path,
    metadata=metadata,
    demo=str(base / 'demo.json'),
    model=model,
  )


@pytest.fixture
def cpu_pass(request):
  """Forces PGD's CPU pass to request.param ('tape' or features joined by '+'), then auto."""
  variant = getattr(request, 'param', support.ALL_CPU_PASS_FEATURES)
  pgd.force_cpu_pass(variant)
  yield variant
  pgd.force_cpu_pass(None)
