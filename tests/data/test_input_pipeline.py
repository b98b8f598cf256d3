"""acet_tf.data.input_pipeline: mnist5k, augment, the resumable stream, TFDS, offline errors."""

import dataclasses
import socket
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf.data import input_pipeline
from tests import support

NUM_TRAIN = 4000  # mnist5k.


# ------------------------------------------------------------------------------------------------
# mnist5k.
# ------------------------------------------------------------------------------------------------


def test_mnist5k_info():
  info = input_pipeline.get_info('mnist5k')
  assert info == input_pipeline.DatasetInfo(
    name='mnist5k',
    image_shape=(28, 28, 1),
    num_classes=10,
    num_train_examples=4000,
    num_test_examples=1000,
    class_names=tuple('0123456789'),
  )


def test_mnist5k_splits_are_stratified_disjoint_and_fixed():
  train = support.take_batches(input_pipeline.load_split('mnist5k', 'train').batch(5000), 1)[0]
  test = support.take_batches(input_pipeline.load_split('mnist5k', 'test').batch(5000), 1)[0]
  for (images, labels), n in ((train, 400), (test, 100)):
    assert images.shape == (10 * n, 28, 28, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [n] * 10)
  train_keys, test_keys = set(support.image_keys(train[0])), set(support.image_keys(test[0]))
  assert len(train_keys) == 4000 and len(test_keys) == 1000
  assert not train_keys & test_keys
  # Not sorted by class: a prefix (eval max_examples) sees every class.
  assert len(set(test[1][:100])) == 10
  input_pipeline._mnist5k_arrays.cache_clear()  # Parse the file again: the same split.
  again = support.take_batches(input_pipeline.load_split('mnist5k', 'test').batch(5000), 1)[0]
  np.testing.assert_array_equal(again[0], test[0])
  np.testing.assert_array_equal(again[1], test[1])


def test_mnist5k_unknown_split():
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.load_split('mnist5k', 'validation')


def test_eval_dataset_batches_and_max_examples():
  batches = support.take_batches(
    input_pipeline.eval_dataset('mnist5k', 'test', 300, max_examples=700), 10
  )
  assert [len(b[1]) for b in batches] == [300, 300, 100]
  test = support.take_batches(input_pipeline.load_split('mnist5k', 'test').batch(700), 1)[0]
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), test[0])


# ------------------------------------------------------------------------------------------------
# augment.
# ------------------------------------------------------------------------------------------------


def _asymmetric_image():
  image = np.zeros((8, 8, 3), np.float32)
  image[:, :3] = 1.0  # Bright left side.
  image[2:5, 3:5, 1] = 0.5
  return tf.constant(image)


def _seeds(n):
  return [tf.constant([7, i], tf.int64) for i in range(n)]


def test_augment_without_crop_or_flip_is_identity():
  image = _asymmetric_image()
  out = input_pipeline.augment(image, tf.constant([1, 2], tf.int32), crop_padding=0, flip=False)
  np.testing.assert_array_equal(out, image)


def test_augment_flips_only_when_asked():
  image = _asymmetric_image().numpy()
  for flip in (False, True):
    outs = [input_pipeline.augment(image, s, 0, flip).numpy() for s in _seeds(20)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs))
    assert any(flipped) == flip
    if flip:
      assert not all(flipped)


def test_augment_crop_is_a_shift_of_the_zero_padded_image():
  image = _asymmetric_image().numpy()
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])
  shifts = set()
  for seed in _seeds(30):
    out = input_pipeline.augment(image, seed, crop_padding=2, flip=False).numpy()
    assert out.shape == image.shape
    match = [
      (dy, dx)
      for dy in range(5)
      for dx in range(5)
      if np.array_equal(out, padded[dy : dy + 8, dx : dx + 8])
    ]
    assert match
    shifts.add(match[0])
  assert len(shifts) > 5  # Random, not a fixed offset.


def test_augment_same_seed_same_output():
  image = tf.random.stateless_uniform([12, 12, 3], seed=[0, 1])
  seed = tf.constant([5, 9], tf.int64)
  a = input_pipeline.augment(image, seed, crop_padding=4, flip=True)
  b = input_pipeline.augment(image, seed, crop_padding=4, flip=True)
  c = input_pipeline.augment(image, tf.constant([5, 10], tf.int64), crop_padding=4, flip=True)
  assert a.shape == image.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------------------
# train_dataset.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def info():
  return input_pipeline.get_info('mnist5k')


def test_train_dataset_epochs_drop_the_remainder(info):
  # 4000 // 300 = 13 steps per epoch; 100 examples are left out of each epoch.
  ds = input_pipeline.train_dataset(support.pipeline_config(300), info)
  assert ds.element_spec[0].shape == (300, 28, 28, 1)
  batches = support.take_batches(ds, 27)
  assert all(b[0].shape == (300, 28, 28, 1) and b[0].dtype == np.float32 for b in batches)
  assert all(b[1].shape == (300,) and b[1].dtype == np.int32 for b in batches)
  keys = [support.image_keys(b[0]) for b in batches]
  epoch0 = sum(keys[:13], [])
  assert len(set(epoch0)) == 3900  # No example twice within an epoch.
  assert set(keys[13]) & set(epoch0)  # Step 13 starts a new epoch.
  assert len(set(sum(keys[13:26], []))) == 3900
  assert keys[13:26] != keys[:13]  # Each epoch has its own order.


def test_train_dataset_is_deterministic_and_resumes_exactly(info):
  config = support.pipeline_config(300, crop_padding=4, flip=True)
  full = support.take_batches(input_pipeline.train_dataset(config, info), 20)
  again = support.take_batches(input_pipeline.train_dataset(config, info), 20)
  for k in (0, 5, 13, 15):  # Inside epoch 0, at the epoch boundary, inside epoch 1.
    resumed = support.take_batches(input_pipeline.train_dataset(config, info, start_step=k), 20 - k)
    for step, (a, b) in enumerate(zip(full[k:], resumed), start=k):
      np.testing.assert_array_equal(a[0], b[0], err_msg=f'start_step={k}, step={step}')
      np.testing.assert_array_equal(a[1], b[1], err_msg=f'start_step={k}, step={step}')
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a[0], b[0])
  # The augmentation is on: the images differ from every stored image.
  stored = set(
    support.image_keys(
      support.take_batches(input_pipeline.load_split('mnist5k', 'train').batch(4000), 1)[0][0]
    )
  )
  assert len(set(support.image_keys(full[0][0])) - stored) > 250


def test_train_dataset_input_pipelines_see_disjoint_examples(info):
  # Batch 500: 8 steps per epoch, so one epoch over both pipelines is the whole train split.
  streams, single = support.pipeline_streams(
    support.pipeline_config(500, crop_padding=4, flip=True), info, 10
  )
  assert streams[0][0][0].shape == (250, 28, 28, 1)
  support.assert_pipelines_split_the_global_batches(streams, single)
  streams, _ = support.pipeline_streams(support.pipeline_config(500), info, 8)
  epoch0 = [k for s in streams for b in s for k in support.image_keys(b[0])]
  assert len(set(epoch0)) == NUM_TRAIN


def test_train_dataset_uneven_shards_stay_in_step():
  # 13 examples, global batch 2: pipeline 0 holds 7 examples, pipeline 1 holds 6, yet both must
  # end each epoch after 13 // 2 = 6 steps.
  with tfds.testing.mock_data(num_examples=13):
    info = input_pipeline.get_info('mnist')
    streams, single = support.pipeline_streams(
      support.pipeline_config(2, dataset='mnist'), info, 20
    )
  support.assert_pipelines_split_the_global_batches(streams, single)


def test_train_dataset_two_replicas_of_one_pipeline_split_each_step(info):
  # One pipeline feeding 2 replicas yields half batches, two per step: together the global stream.
  config = support.pipeline_config(400, crop_padding=4)
  whole = support.take_batches(input_pipeline.train_dataset(config, info, start_step=8), 6)
  context = tf.distribute.InputContext(
    num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=2
  )
  halves = support.take_batches(
    input_pipeline.train_dataset(config, info, start_step=8, input_context=context), 12
  )
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
      batch[0], np.concatenate([halves[2 * step][0], halves[2 * step + 1][0]])
    )


def test_train_dataset_rejects_bad_sizes(info):
  with pytest.raises(ValueError, match='4000 training examples.*batch_size=5000'):
    input_pipeline.train_dataset(support.pipeline_config(5000), info)
  wrong = dataclasses.replace(info, image_shape=(32, 32, 3))
  with pytest.raises(ValueError, match='shape'):
    input_pipeline.train_dataset(support.pipeline_config(100), wrong)


# ------------------------------------------------------------------------------------------------
# TFDS (mocked: no data on this machine).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))])
def test_tfds_under_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12):
    info = input_pipeline.get_info(name)
    assert (info.name, info.image_shape, info.num_classes) == (name, shape, 10)
    # mock_data leaves info.splits empty: the sizes are counted.
    assert (info.num_train_examples, info.num_test_examples) == (12, 12)
    assert len(info.class_names) == 10
    images, labels = support.take_batches(input_pipeline.load_split(name, 'test').batch(100), 1)[0]
    assert images.shape == (12,) + shape and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert labels.dtype == np.int32 and ((0 <= labels) & (labels < 10)).all()
    batches = support.take_batches(
      input_pipeline.train_dataset(
        support.pipeline_config(4, crop_padding=4, flip=True, dataset=name), info
      ),
      5,
    )
    assert [b[0].shape for b in batches] == [(4,) + shape] * 5


def test_emnist_is_transposed():
  with tfds.testing.mock_data(num_examples=3):
    raw = support.take_batches(tfds.builder('emnist/letters').as_dataset(split='test'), 3)
    ours = support.take_batches(input_pipeline.load_split('emnist/letters', 'test'), 3)
  assert not np.array_equal(raw[0]['image'], raw[0]['image'].transpose(1, 0, 2))
  for r, (image, label) in zip(raw, ours):
    np.testing.assert_array_equal(np.round(image * 255), r['image'].transpose(1, 0, 2))
    assert label == r['label']


# ------------------------------------------------------------------------------------------------
# Offline: a dataset that is not prepared fails fast with advice.
# ------------------------------------------------------------------------------------------------


def _assert_fails_fast(name, load, data_dir):
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetUnavailableError) as error:
    load(name, data_dir=str(data_dir))
  assert time.monotonic() - start < 30
  message = str(error.value)
  assert f"dataset '{name}' is not prepared in {data_dir}" in message
  assert f'tfds build {name}' in message and 'configs/mnist5k.py' in message


@pytest.mark.parametrize(
  'load',
  [
    input_pipeline.get_info,
    lambda name, data_dir: input_pipeline.load_split(name, 'train', data_dir),
  ],
)
def test_not_prepared_without_network_fails_fast(load, tmp_path, monkeypatch):
  # Hermetic: never starts a real download, even on a machine with network.
  monkeypatch.setattr(input_pipeline, '_network_available', lambda: False)
  _assert_fails_fast('cifar10', load, tmp_path)


def test_network_probe_on_loopback():
  # Only loopback traffic in tests: a listening port answers, a closed one does not.
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    assert input_pipeline._network_available(server.getsockname(), timeout=2.0)
  with socket.socket() as closed:
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
  assert not input_pipeline._network_available(('127.0.0.1', port), timeout=2.0)
