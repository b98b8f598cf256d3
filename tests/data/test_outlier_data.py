"""Training outliers: config.out_data's sources and shares, checked and loaded before step one."""

import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from acet_tf.data import out_datasets
from acet_tf.data import outlier_data
from tests import support


def _out_data(sources, shares):
  return ml_collections.ConfigDict(dict(sources=tuple(sources), shares=tuple(shares)))


def test_the_default_and_mixes_are_accepted():
  outlier_data.check_out_data(_out_data(['noise'], [1.0]), 'mnist5k')
  mix = _out_data(['noise', 'photos', 'npz:/data/x.npz'], [0.5, 0.25, 0.25])
  outlier_data.check_out_data(mix, 'mnist5k')
  assert outlier_data.noise_share(mix) == 0.5
  assert outlier_data.image_sources(mix) == {'photos': 0.25, 'npz:/data/x.npz': 0.25}


@pytest.mark.parametrize(
  'sources, shares, dataset, message',
  [
    ([], [], 'mnist5k', 'is empty'),
    (['noise', 'photos'], [1.0], 'mnist5k', 'one share per source'),
    (['noise', 'photos'], [0.5, 0.6], 'mnist5k', 'sum to 1'),
    (['noise', 'photos'], [1.5, -0.5], 'mnist5k', 'positive'),
    (['photos', 'photos'], [0.5, 0.5], 'mnist5k', 'twice'),
    (['mnist'], [1.0], 'mnist', 'the in-distribution itself'),
    (['folder:./a/../a'], [1.0], 'folder:a', 'the in-distribution itself'),
    (['npz:'], [1.0], 'mnist5k', 'give a path'),
  ],
)
def test_bad_out_data_is_refused_naming_it(sources, shares, dataset, message):
  with pytest.raises(outlier_data.OutlierDataError, match=message):
    outlier_data.check_out_data(_out_data(sources, shares), dataset)


def test_training_photos_are_not_the_evaluation_photos():
  assert not set(outlier_data.TRAIN_PHOTOS) & set(out_datasets.PHOTOS)
  folder = out_datasets.skimage_data_dir()
  for name in outlier_data.TRAIN_PHOTOS:
    assert os.path.exists(os.path.join(folder, name)), name


def test_photo_crops_have_the_in_distribution_shape_and_depend_on_the_seed():
  a = outlier_data.photo_crops((28, 28, 1), 16, seed=3)
  b = outlier_data.photo_crops((28, 28, 1), 16, seed=3)
  c = outlier_data.photo_crops((28, 28, 1), 16, seed=4)
  assert a.shape == (16, 28, 28, 1) and a.dtype == np.float32
  assert 0.0 <= a.min() and a.max() <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({x.tobytes() for x in a}) == 16  # Distinct crops, not one picture repeated.
  rgb = outlier_data.photo_crops((12, 20, 3), 4, seed=0)
  assert rgb.shape == (4, 12, 20, 3)


def test_npz_and_folder_outliers_are_converted_to_the_in_distribution_shape(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  np.savez(tmp_path / 'out.npz', x_train=x, y_train=np.zeros(10))
  got = outlier_data.load_outlier_images(f'npz:{tmp_path}/out.npz', (4, 4, 1), num_photos=0)
  assert got.shape == (10, 4, 4, 1) and got.dtype == np.float32
  want = out_datasets.to_image_shape(x.astype(np.float32) / 255, (4, 4, 1)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6)
  root = tmp_path / 'folder'
  support.make_image_folder(str(root), ['a', 'b'], per_class=3, size=(9, 7), formats=('png',))
  got = outlier_data.load_outlier_images(f'folder:{root}', (5, 5, 3), num_photos=0)
  assert got.shape == (6, 5, 5, 3)


def test_bad_outlier_files_are_refused_naming_them(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(outlier_data.OutlierDataError, match='holds no'):
    outlier_data.load_outlier_images(f'folder:{empty}', (4, 4, 1), num_photos=0)
  bad = tmp_path / 'bad'
  bad.mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(bad / 'ok.png')
  (bad / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')
  with pytest.raises(outlier_data.OutlierDataError, match='broken.png'):
    outlier_data.load_outlier_images(f'folder:{bad}', (4, 4, 1), num_photos=0)
  np.savez(tmp_path / 'flat.npz', x_train=np.zeros((5, 7)))
  with pytest.raises(outlier_data.OutlierDataError, match=r'x_train has shape \[5, 7\]'):
    outlier_data.load_outlier_images(f'npz:{tmp_path}/flat.npz', (4, 4, 1), num_photos=0)
  np.savez(tmp_path / 'nox.npz', images=np.zeros((5, 4, 4)))
  with pytest.raises(outlier_data.OutlierDataError, match='no array x_train'):
    outlier_data.load_outlier_images(f'npz:{tmp_path}/nox.npz', (4, 4, 1), num_photos=0)
  with pytest.raises(outlier_data.OutlierDataError, match='does not exist'):
    outlier_data.load_outlier_images(f'npz:{tmp_path}/none.npz', (4, 4, 1), num_photos=0)
