"""Small helpers shared by test modules (fixtures live in conftest.py)."""

import os
import re
import subprocess
import sys
import time

import keras
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from acet_tf.artifacts import export_layout
from acet_tf.configs import common
from acet_tf.data import input_pipeline
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.models import prood
from acet_tf.ops import pgd
from acet_tf.robustness import ibp

# PGD's CPU pass variants (pgd.CPU_PASS_FEATURES; the conftest fixture `cpu_pass` forces one):
# the automatic choice differs between kernel libraries (oneDNN, Eigen), so a test of a variant
# names it.
ALL_CPU_PASS_FEATURES = '+'.join(pgd.CPU_PASS_FEATURES)
CPU_PASS_VARIANTS = ['tape', 'noinline', 'noinline+conv', 'noinline+matmul', ALL_CPU_PASS_FEATURES]


def keras_outputs(model, images, threshold):
  """What the export should return, computed from the Keras model. images float32 in [0, 1]."""
  probs = predictions_lib.make_predict_fn(model)(images).numpy()
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
  model_name None: the flags name the model (--model_config_file).

  Returns (process, base URL); fails the test with the log's tail if it does not start in 300 s.
  """
  with open(log, 'w') as err:
    proc = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'acet_tf.serve',
        *([f'--export_dir={export_dir}', f'--model_name={model_name}'] if model_name else []),
        '--port=0',  # gRPC, as TF Serving's --port.
        '--rest_api_port=0',
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


def grpc_address(log):
  """host:port of the gRPC server a start_server log names."""
  return re.search(r'Serving gRPC at (127\.0\.0\.1:\d+)', log.read_text()).group(1)


def copy_version_slowly(src, dst):
  """Copies a version directory file by file, the manifest FIRST and the variables last, with
  pauses: the worst order a copier could take."""
  files = sorted(os.path.relpath(os.path.join(r, n), src) for r, _, ns in os.walk(src) for n in ns)
  files.sort(key=lambda f: (f != export_layout.MANIFEST, f.startswith('variables')))
  for rel in files:
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    with open(os.path.join(src, rel), 'rb') as f:
      data = f.read()
    with open(os.path.join(dst, rel), 'wb') as f:
      f.write(data[: len(data) // 2])  # Half now, the rest after a poll interval or two.
      f.flush()
      time.sleep(0.6)
      yield rel  # The caller looks while this file is half written.
      f.write(data[len(data) // 2 :])


# Data and models shared by the data, training and model tests.

IMAGE_FORMATS = ('png', 'jpg', 'bmp', 'gif')


def tiny_step_config(method, batch=8):
  c = common.base_config(method)
  c.batch_size = batch
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.05
  if method == 'acet':
    c.pgd.steps = 3
    c.pgd.step_size = 0.1
  return c


def tiny_model(seed=None):
  """A small CNN of logits, 12x12x1 images -> 3 classes; seed: keras.utils.set_random_seed first."""
  if seed is not None:
    keras.utils.set_random_seed(seed)
  return keras.Sequential(
    [
      keras.Input((12, 12, 1)),
      keras.layers.Conv2D(4, 3, padding='same', activation='relu'),
      keras.layers.MaxPooling2D(2),
      keras.layers.Flatten(),
      keras.layers.Dense(16, activation='relu'),
      keras.layers.Dense(3),
    ]
  )


def tiny_prood(seed=0):
  """A ProoD model: tiny_model(seed) and a small discriminator of its images."""
  classifier = tiny_model(seed)
  return prood.ProodModel(classifier, prood.discriminator((12, 12, 1), (4, 8), 16))


def box_points(x, eps, num, seed):
  """[num] points of the L-inf box of radius eps around x: random corners (even i) and uniform
  points (odd i), from stateless seeds [i, seed]."""
  lo, hi = ibp.input_box(x, eps)
  out = []
  for i in range(num):
    u = tf.random.stateless_uniform(x.shape, seed=[i, seed])
    out.append(tf.where(u < 0.5, lo, hi) if i % 2 == 0 else lo + u * (hi - lo))
  return out


def toy_data(n, seed=0):
  """Three classes of 12x12 images told apart by which third is bright."""
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, 3, size=n).astype(np.int32)
  images = rng.rand(n, 12, 12, 1).astype(np.float32) * 0.3
  for i, y in enumerate(labels):
    images[i, 4 * y : 4 * y + 4] += 0.7
  return images, labels


def toy_dataset(images, labels, batch):
  return (
    tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(batch, drop_remainder=True)
  )


def pipeline_config(batch_size, crop_padding=0, flip=False, dataset='mnist5k'):
  return ml_collections.ConfigDict(
    dict(
      dataset=dataset,
      data_dir='',
      batch_size=batch_size,
      seed=3,
      shuffle_buffer=1000,
      num_epochs=5,
      num_train_steps=-1,
      augment=dict(crop_padding=crop_padding, flip=flip),
    )
  )


def take_batches(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def image_keys(images):
  """One hashable key per image of a float batch [b, H, W, C]."""
  return [np.round(x * 255).astype(np.uint8).tobytes() for x in images]


def pipeline_streams(config, info, steps):
  """The batches of 2 input pipelines (one replica each) and of the single pipeline."""
  streams = []
  for i in range(2):
    context = tf.distribute.InputContext(
      num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2
    )
    streams.append(
      take_batches(input_pipeline.train_dataset(config, info, input_context=context), steps)
    )
  return streams, take_batches(input_pipeline.train_dataset(config, info), steps)


def assert_pipelines_split_the_global_batches(streams, single):
  for step, (a, b, whole) in enumerate(zip(*streams, single)):
    assert 2 * len(a[1]) == 2 * len(b[1]) == len(whole[1]), f'step {step}'
    assert not set(image_keys(a[0])) & set(image_keys(b[0])), f'step {step}'
    # Same shuffle, same augmentation seeds: together the pipelines hold the global batch.
    assert sorted(image_keys(a[0]) + image_keys(b[0])) == sorted(image_keys(whole[0])), (
      f'step {step}'
    )


def random_image(rng, size, channels=3):
  shape = size + ((channels,) if channels > 1 else ())
  return rng.integers(0, 256, shape, dtype=np.uint8)


def make_image_folder(
  root, classes, per_class, size=(12, 10), formats=IMAGE_FORMATS, seed=0, channels=3
):
  """root/<class>/<i>.<format> with random pixels; returns {path: uint8 array written}."""
  rng = np.random.default_rng(seed)
  written = {}
  for name in classes:
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      ext = formats[i % len(formats)]
      path = os.path.join(root, name, f'{i:03d}.{ext}')
      pixels = random_image(rng, size, channels)
      Image.fromarray(pixels).save(path)
      written[path] = pixels
  return written
