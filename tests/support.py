"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from acet_tf import attacks
from acet_tf import evaluation
from acet_tf import input_pipeline

# PGD's CPU pass variants (attacks.CPU_PASS_FEATURES; the conftest fixture `cpu_pass` forces one):
# the automatic choice differs between kernel libraries (oneDNN, Eigen), so a test of a variant
# names it.
ALL_CPU_PASS_FEATURES = '+'.join(attacks.CPU_PASS_FEATURES)
CPU_PASS_VARIANTS = ['tape', 'noinline', 'noinline+conv', 'noinline+matmul', ALL_CPU_PASS_FEATURES]


def keras_outputs(model, images, threshold):
  """What the export should return, computed from the Keras model. images float32 in [0, 1]."""
  probs = evaluation.make_predict_fn(model)(images).numpy()
  conf = probs.max(axis=1)
  return {
    'probabilities': probs,
    'confidence': conf,
    'predicted_class': probs.argmax(axis=1).astype(np.int32),
    'accepted': conf >= threshold,
  }


def digits(n=32):
  """float32 [n, 28, 28, 1] test digits in [0, 1] (exact multiples of 1/255), labels int32 [n]."""
  images, labels = next(iter(input_pipeline.eval_dataset('mnist5k', 'test', n, max_examples=n)))
  return images.numpy(), labels.numpy()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(export_dir, model_name, log, *flags):
  """The acet_tf.serve binary on port 0 (it picks a free port and logs it), its stderr in `log`.

  Returns (process, base URL); fails the test with the log's tail if it does not start in 300 s.
  """
  with open(log, 'w') as err:
    proc = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'acet_tf.serve',
        f'--export_dir={export_dir}',
        f'--model_name={model_name}',
        '--port=0',
        *flags,
      ],
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=err,
    )
  deadline = time.monotonic() + 300
  while True:
    match = re.search(r'at http://127\.0\.0\.1:(\d+)', log.read_text())
    if match:
      return proc, f'http://127.0.0.1:{match.group(1)}'
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'server did not start:\n{log.read_text()[-3000:]}')
    time.sleep(0.2)
