"""Your own data: folder:PATH and npz:PATH datasets (acet_tf/data/custom_data.py)."""

import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from acet_tf.configs import custom
from acet_tf.data import custom_data
from acet_tf.data import input_pipeline
from acet_tf.exporting import abstaining_classifier
from acet_tf.training import trainer
from tests import support


def _arrays(name, split, options=None):
  ds = input_pipeline.load_split(name, split, options=options)
  x, y = zip(*ds.as_numpy_iterator())
  return np.stack(x), np.array(y)


def test_folder_class_names_split_and_formats(tmp_path):
  root = str(tmp_path / 'data')
  written = support.make_image_folder(root, ['dog', 'cat', 'eel'], per_class=10)
  os.makedirs(os.path.join(root, '.hidden'))  # Ignored, as are files of other types.
  (tmp_path / 'data' / 'cat' / 'notes.txt').write_text('not an image')
  name = f'folder:{root}'
  info = input_pipeline.get_info(name)
  assert info.class_names == ('cat', 'dog', 'eel')  # Sorted folder names.
  assert info.image_shape == (12, 10, 3)
  assert (info.num_train_examples, info.num_test_examples) == (24, 6)  # round(0.2 * 10) = 2.
  x_train, y_train = _arrays(name, 'train')
  x_test, y_test = _arrays(name, 'test')
  assert x_train.dtype == np.float32 and 0 <= x_train.min() and x_train.max() <= 1
  np.testing.assert_array_equal(np.bincount(y_test), [2, 2, 2])  # Stratified.
  np.testing.assert_array_equal(np.bincount(y_train), [8, 8, 8])
  # Lossless formats come back exactly (pixel / 255), with the label of their folder; every file
  # is in exactly one split.
  stored = {
    np.round(x * 255).astype(np.uint8).tobytes(): y
    for x, y in zip(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))
  }
  assert len(stored) == 30
  for path, pixels in written.items():
    if path.endswith(('png', 'bmp')):
      assert stored[pixels.tobytes()] == info.class_names.index(
        os.path.basename(os.path.dirname(path))
      )
  # The first test images cover several classes (one fixed shuffle, not sorted by class).
  assert len(set(y_test[:3])) > 1
  # The split is fixed: a fresh read gives the same arrays.
  custom_data._load_cached.cache_clear()
  np.testing.assert_array_equal(_arrays(name, 'test')[0], x_test)


def test_folder_with_train_and_test_folders_and_fraction(tmp_path):
  root = tmp_path / 'data'
  support.make_image_folder(str(root / 'train'), ['a', 'b'], per_class=5, seed=1)
  support.make_image_folder(str(root / 'test'), ['a', 'b'], per_class=2, seed=2)
  info = input_pipeline.get_info(f'folder:{root}')
  assert (info.num_train_examples, info.num_test_examples) == (10, 4)
  assert info.class_names == ('a', 'b')
  flat = tmp_path / 'flat'
  support.make_image_folder(str(flat), ['a', 'b'], per_class=10)
  info = input_pipeline.get_info(f'folder:{flat}', options=custom_data.Options(test_fraction=0.5))
  assert (info.num_train_examples, info.num_test_examples) == (10, 10)


def test_folder_resize_and_channels(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b'], per_class=4, size=(20, 30), formats=('png',))
  name = f'folder:{root}'
  grey = input_pipeline.get_info(name, options=custom_data.Options(image_size=8, channels=1))
  assert grey.image_shape == (8, 8, 1)
  rgb, _ = _arrays(name, 'train', custom_data.Options(channels=3))
  mono, _ = _arrays(name, 'train', custom_data.Options(channels=1))
  # RGB -> grey with ITU-R 601 weights, kept as float (not rounded to a pixel value).
  np.testing.assert_allclose(mono[..., 0], rgb @ np.float32([0.299, 0.587, 0.114]), atol=1e-6)
  assert not np.allclose(mono * 255, np.round(mono * 255))
  small, _ = _arrays(name, 'train', custom_data.Options(image_size=8))
  assert small.shape[1:] == (8, 8, 3)


def test_conversion_equals_the_served_image_bytes_decoding(tmp_path):
  """A file sent to the served image_bytes signature gives exactly the training pixels."""
  for size, image_size, channels in (((20, 30), 8, 1), ((6, 5), 9, 3), ((8, 8), 0, 1)):
    root = str(tmp_path / f'data{size[0]}')
    written = support.make_image_folder(
      root, ['a', 'b'], per_class=3, size=size, formats=('png', 'jpg')
    )
    name = f'folder:{root}'
    options = custom_data.Options(image_size=image_size, channels=channels)
    info = input_pipeline.get_info(name, options=options)
    stored = {x.tobytes() for split in ('train', 'test') for x in _arrays(name, split, options)[0]}
    for path in written:
      with open(path, 'rb') as f:
        served = abstaining_classifier.decode_images(tf.constant([f.read()]), info.image_shape)[
          0
        ].numpy()
      assert served.tobytes() in stored, (path, image_size, channels)
  grey_root = str(tmp_path / 'grey')
  support.make_image_folder(grey_root, ['a', 'b'], per_class=4, channels=1, formats=('png', 'jpg'))
  assert input_pipeline.get_info(f'folder:{grey_root}').image_shape == (12, 10, 1)


def _npz(path, x_train, y_train, x_test, y_test, **extra):
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
  return f'npz:{path}'


def test_npz_uint8_and_float(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
  y = np.arange(20) % 4
  name = _npz(
    tmp_path / 'u8.npz',
    x[:16],
    y[:16, None],
    x[16:],
    y[16:],
    class_names=np.array(['w', 'x', 'y', 'z']),
  )
  info = input_pipeline.get_info(name)
  assert info.class_names == ('w', 'x', 'y', 'z')
  assert info.image_shape == (6, 6, 1) and info.num_train_examples == 16
  images, labels = _arrays(name, 'train')
  np.testing.assert_array_equal(images[..., 0] * 255, x[:16].astype(np.float32))
  np.testing.assert_array_equal(labels, y[:16])
  xf = rng.uniform(0, 1, (10, 5, 5, 3)).astype(np.float64)
  name = _npz(tmp_path / 'f.npz', xf[:8], np.arange(8) % 2, xf[8:], [0, 1])
  info = input_pipeline.get_info(name)
  assert info.class_names == ('0', '1')
  images, _ = _arrays(name, 'train')
  np.testing.assert_array_equal(images, xf[:8].astype(np.float32))  # Kept exact, not quantised.


def test_folder_train_stream_resumes_exactly_and_shards(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b', 'c'], per_class=10, formats=('png',))
  name = f'folder:{root}'
  info = input_pipeline.get_info(name)
  config = support.pipeline_config(4, crop_padding=2, flip=True, dataset=name)
  full = support.take_batches(input_pipeline.train_dataset(config, info), 14)
  for k in (3, 6, 9):  # 6 steps per epoch: inside, at and past the first boundary.
    resumed = support.take_batches(input_pipeline.train_dataset(config, info, start_step=k), 14 - k)
    for a, b in zip(full[k:], resumed):
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_array_equal(a[1], b[1])
  streams, single = support.pipeline_streams(config, info, 6)
  support.assert_pipelines_split_the_global_batches(streams, single)


# ------------------------------------------------------------------------------------------------
# Bad input: each message names the file and the problem.
# ------------------------------------------------------------------------------------------------


def test_unreadable_image_names_the_file(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b'], per_class=3)
  bad = os.path.join(root, 'b', 'broken.png')
  with open(bad, 'wb') as f:
    f.write(b'\x89PNG not really')
  with pytest.raises(input_pipeline.DatasetError, match=f'cannot read image {bad}'):
    input_pipeline.get_info(f'folder:{root}')


def test_empty_class_names_the_folder(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b'], per_class=3)
  os.makedirs(os.path.join(root, 'c'))
  with pytest.raises(
    input_pipeline.DatasetError, match=f'class folder {os.path.join(root, "c")} is empty'
  ):
    input_pipeline.get_info(f'folder:{root}')
  x = np.zeros((6, 4, 4), np.uint8)
  name = _npz(tmp_path / 'gap.npz', x, [0, 0, 2, 2, 0, 2], x[:2], [0, 2])
  with pytest.raises(input_pipeline.DatasetError, match=r"gap.npz: class 1 \('1'\) is empty"):
    input_pipeline.get_info(name)


def test_mixed_sizes_without_image_size_names_two_files(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a'], per_class=2, size=(12, 10), formats=('png',))
  support.make_image_folder(root, ['b'], per_class=2, size=(9, 9), formats=('png',))
  with pytest.raises(input_pipeline.DatasetError, match='mixed sizes') as e:
    input_pipeline.get_info(f'folder:{root}')
  message = str(e.value)
  assert re.search(re.escape(os.path.join(root, 'a', '')) + r'00[01]\.png is 12x10', message)
  assert re.search(re.escape(os.path.join(root, 'b', '')) + r'00[01]\.png is 9x9', message)
  assert 'set image_size' in message
  info = input_pipeline.get_info(f'folder:{root}', options=custom_data.Options(image_size=9))
  assert info.image_shape == (9, 9, 3)


def test_labels_out_of_range_name_the_file(tmp_path):
  x = np.zeros((4, 4, 4), np.uint8)
  name = _npz(
    tmp_path / 'labels.npz', x, [0, 1, 0, 1], x[:2], [1, 2], class_names=np.array(['no', 'yes'])
  )
  with pytest.raises(
    input_pipeline.DatasetError,
    match=r'labels.npz: y_test\[1\] = 2 is out of range: labels must be in 0..1',
  ):
    input_pipeline.get_info(name)
  name = _npz(tmp_path / 'negative.npz', x, [0, -1, 0, 1], x[:2], [1, 0])
  with pytest.raises(input_pipeline.DatasetError, match=r'negative.npz: y_train\[1\] = -1 is out'):
    input_pipeline.get_info(name)


def test_bad_npz_files_are_named(tmp_path):
  (tmp_path / 'junk.npz').write_text('not a zip')
  with pytest.raises(input_pipeline.DatasetError, match='cannot read .*junk.npz as an .npz'):
    input_pipeline.get_info(f'npz:{tmp_path / "junk.npz"}')
  np.savez(tmp_path / 'partial.npz', x_train=np.zeros((2, 3, 3), np.uint8))
  with pytest.raises(
    input_pipeline.DatasetError, match=r"partial.npz lacks the arrays \['y_train'"
  ):
    input_pipeline.get_info(f'npz:{tmp_path / "partial.npz"}')
  x = np.full((4, 3, 3), 2.0)
  name = _npz(tmp_path / 'range.npz', x, [0, 1, 0, 1], x[:2], [0, 1])
  with pytest.raises(input_pipeline.DatasetError, match=r'range.npz: x_train is float .* \[0, 1\]'):
    input_pipeline.get_info(name)
  with pytest.raises(input_pipeline.DatasetError, match='does not exist'):
    input_pipeline.get_info(f'folder:{tmp_path / "missing"}')


def test_too_few_examples_for_a_batch_fails_before_training(tmp_path):
  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b'], per_class=5)  # 8 training images.
  config = custom.get_config(f'plain,data=folder:{root},model=lenet,runlocal')
  config.strategy = 'one_device'
  config.batch_size = 16
  with pytest.raises(
    ValueError, match=f'Too few examples for a batch: .* 8 training examples of folder:{root}'
  ):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_options_are_refused_for_fixed_datasets_and_checked():
  with pytest.raises(ValueError, match="apply to 'folder:' and 'npz:' datasets only"):
    input_pipeline.get_info('mnist5k', options=custom_data.Options(image_size=32))
  with pytest.raises(ValueError, match='channels must be 0'):
    custom_data.Options(channels=2)
  with pytest.raises(ValueError, match=r'test_fraction must be in \(0, 1\)'):
    custom_data.Options(test_fraction=1.0)
  # A run config from before these keys existed reads as the defaults.
  old = ml_collections.ConfigDict({'dataset': 'mnist5k'})
  assert input_pipeline.options_from_config(old) == custom_data.Options()


def test_custom_config_arguments():
  c = custom.get_config('acet,data=folder:/some/path,image_size=64,channels=1,epochs=7')
  assert (c.dataset, c.image_size, c.channels, c.num_epochs) == ('folder:/some/path', 64, 1, 7)
  assert c.model == 'preact_resnet' and c.optimizer.name == 'sgd' and c.pgd.steps == 40
  c = custom.get_config('ceda,data=npz:x.npz,model=tests.model_factories:small_cnn')
  assert c.model == 'tests.model_factories:small_cnn' and c.optimizer.name == 'adam'
  with pytest.raises(ValueError, match='needs data=folder:PATH or data=npz:PATH'):
    custom.get_config('acet')
  with pytest.raises(ValueError, match="Unknown config argument 'size=3'"):
    custom.get_config('acet,data=npz:x.npz,size=3')


def test_tf_is_not_confused_by_uint8_and_float_splits(tmp_path):
  """A uint8 train split and a float test split both come out as float32 in [0, 1]."""
  x8 = np.full((4, 3, 3), 255, np.uint8)
  xf = np.full((2, 3, 3), 0.5, np.float32)
  name = _npz(tmp_path / 'mixed.npz', x8, [0, 1, 0, 1], xf, [0, 1])
  train_x, _ = _arrays(name, 'train')
  test_x, _ = _arrays(name, 'test')
  assert train_x.dtype == test_x.dtype == np.float32
  assert float(train_x.max()) == 1.0 and float(test_x.max()) == 0.5
  batch = next(iter(input_pipeline.eval_dataset(name, 'test', 2)))[0]
  assert batch.dtype == tf.float32
