"""Training outliers from real images: the sources of p_out besides the paper's noise, checked
before step one.

`config.out_data` (configs/common.py) names the sources of each step's out-batch and their shares:
  sources  tuple of 'noise' (the paper's noise, made in the train step, ops/noise.py), 'photos'
           (random crops of scikit-image's bundled pictures that the 'photos' evaluation out-set
           does not use: TRAIN_PHOTOS), a TFDS name (its train split), 'folder:PATH' (every image
           below PATH, any sub-folders) or 'npz:PATH' (the array x_train; labels are ignored);
  shares   one float per source, summing to 1: the share of the out-batch drawn from it.
The default, ('noise',) with (1.0,), is the paper's recipe. Every method that uses p_out takes it.

Images are brought to the in-distribution's shape (out_datasets.to_image_shape: resize, grey <->
RGB) and float32 in [0, 1]. Bad outlier data is an OutlierDataError naming it, raised by
check_out_data / load_outlier_images before any training: an unknown source, shares that do not
sum to 1, the in-distribution named as its own outliers, an empty folder, an unreadable file, an
array that is not images.
"""

import math
import os

import numpy as np
import tensorflow as tf

from acet_tf.data import custom_data
from acet_tf.data import input_pipeline
from acet_tf.data import out_datasets

NOISE = 'noise'
PHOTOS = 'photos'
# scikit-image's pictures that out_datasets.PHOTOS (the evaluation's 'photos' set) leaves out:
# microscopy, a retina, a phantom, silhouettes, text pages, a logo, a motion-blurred clock. The
# right camera of the motorcycle stereo pair is left out too: it shows the evaluation's scene.
TRAIN_PHOTOS = (
  'cell.png',
  'clock_motion.png',
  'horse.png',
  'ihc.png',
  'logo.png',
  'microaneurysms.png',
  'page.png',
  'phantom.png',
  'retina.jpg',
  'text.png',
)
# Crops of each picture: squares with a side in this range of its shorter side, so a crop shows
# a part of a scene (as an outlier photo of another dataset would), not a resized whole picture.
CROP_FRACTIONS = (0.1, 0.5)
MAX_IMAGES = 50_000  # Read per dataset source: enough distinct outliers, bounded memory.


class OutlierDataError(ValueError):
  """Outlier data that cannot be trained on; the message names the source and what is wrong."""


def check_out_data(out_data, in_dataset):
  """Raises OutlierDataError unless `out_data` (config.out_data) is well-formed for `in_dataset`.

  Reads no images (load_outlier_images does): it checks the names, the shares and that the
  in-distribution is not named as its own outliers.
  """
  sources, shares = tuple(out_data.sources), tuple(out_data.shares)
  if not sources:
    raise OutlierDataError('config.out_data.sources is empty: name at least one source.')
  if len(shares) != len(sources):
    raise OutlierDataError(
      f'config.out_data.shares {shares} must give one share per source of {sources}.'
    )
  if len(set(sources)) != len(sources):
    raise OutlierDataError(f'config.out_data.sources {sources} names a source twice.')
  if any(not isinstance(s, (int, float)) or s <= 0 for s in shares) or not math.isclose(
    sum(shares), 1.0, abs_tol=1e-6
  ):
    raise OutlierDataError(
      f'config.out_data.shares {shares} must be positive and sum to 1 (one per source).'
    )
  for source in sources:
    if source in (NOISE, PHOTOS):
      continue
    if source == in_dataset or _same_path(source, in_dataset):
      raise OutlierDataError(
        f'config.out_data names {source!r}, the in-distribution itself, as outliers: training '
        'to be unconfident on it would undo the classifier.'
      )
    if custom_data.is_custom(source) and not source.partition(':')[2]:
      raise OutlierDataError(f"config.out_data source {source!r}: give a path after ':'.")


def _same_path(a, b):
  if not (custom_data.is_custom(a) and custom_data.is_custom(b)):
    return False
  return os.path.realpath(a.partition(':')[2]) == os.path.realpath(b.partition(':')[2])


def image_sources(out_data):
  """The sources with their shares, noise excluded: {source: share}."""
  return {s: float(w) for s, w in zip(out_data.sources, out_data.shares) if s != NOISE}


def noise_share(out_data):
  """The share of the out-batch made of the paper's noise (0 if noise is not a source)."""
  return sum(float(w) for s, w in zip(out_data.sources, out_data.shares) if s == NOISE)


def photo_crops(image_shape, num_images, seed):
  """`num_images` random square crops of TRAIN_PHOTOS, float32 [N, H, W, C] in [0, 1].

  Picture, crop size (CROP_FRACTIONS of its shorter side) and position are drawn with
  numpy's generator from `seed`; each crop is resized to (H, W) and converted to C channels.
  """
  folder = out_datasets.skimage_data_dir()
  pictures = []
  for name in TRAIN_PHOTOS:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      raise OutlierDataError(
        f"the 'photos' outliers need {path}: the installed scikit-image does not bundle {name}."
      )
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    pictures.append(image.numpy())
  rng = np.random.default_rng(seed)
  crops = []
  for _ in range(num_images):
    picture = pictures[rng.integers(len(pictures))]
    h, w = picture.shape[:2]
    low, high = (max(2, int(f * min(h, w))) for f in CROP_FRACTIONS)
    side = int(rng.integers(low, high + 1))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = picture[top : top + side, left : left + side].astype(np.float32) / 255.0
    crops.append(out_datasets.to_image_shape(crop, image_shape).numpy())
  return np.stack(crops)


def load_outlier_images(source, image_shape, *, num_photos, data_dir=None, seed=0):
  """The images of one non-noise source, float32 [N, H, W, C] in [0, 1] of `image_shape`.

  'photos' gives `num_photos` crops; a dataset gives its train images (at most MAX_IMAGES, a
  seeded sample if more). OutlierDataError (or DatasetUnavailableError for a TFDS set that is
  not on this machine) names what is wrong.
  """
  if source == PHOTOS:
    return photo_crops(image_shape, num_photos, seed)
  if custom_data.is_custom(source):
    images = _custom_images(source)
  else:
    images = _tfds_images(source, data_dir)
  if len(images) == 0:
    raise OutlierDataError(f'outlier source {source!r} holds no images.')
  if len(images) > MAX_IMAGES:
    keep = np.random.default_rng(seed).choice(len(images), MAX_IMAGES, replace=False)
    images = images[np.sort(keep)]
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  converted = [
    out_datasets.to_image_shape(images[i : i + 256], image_shape).numpy()
    for i in range(0, len(images), 256)
  ]
  return np.concatenate(converted).astype(np.float32)


def _custom_images(source):
  kind, _, path = source.partition(':')
  if not os.path.exists(path):
    raise OutlierDataError(f'outlier source {source!r}: {path} does not exist.')
  try:
    if kind == 'npz':
      return _npz_outliers(source, path)
    return _folder_images(source, path)
  except custom_data.DatasetError as e:
    raise OutlierDataError(f'outlier source {source!r}: {e}') from e


def _npz_outliers(source, path):
  try:
    with np.load(path) as data:
      if 'x_train' not in data:
        raise OutlierDataError(
          f'outlier source {source!r}: {path} has no array x_train (it holds {sorted(data)}).'
        )
      x = data['x_train']
  except OutlierDataError:
    raise
  except Exception as e:  # A missing, truncated or non-npz file: numpy raises many kinds.
    raise OutlierDataError(f'outlier source {source!r}: cannot read {path}: {e}') from e
  images = custom_data.npz_images(path, 'x_train', x)
  if images.shape[-1] in (2, 4):  # Grey or RGB with alpha: the alpha channel is dropped.
    images = images[..., :-1]
  return images


def _folder_images(source, path):
  """Every image file below `path` (sub-folders included), uint8 [N, h, w, c] of one size after
  to_image_shape; files of several sizes are resized one by one."""
  files = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(path)
    for name in names
    if name.lower().endswith(custom_data.IMAGE_EXTENSIONS)
  )
  if not files:
    raise OutlierDataError(
      f'outlier source {source!r}: {path} holds no {"/".join(custom_data.IMAGE_EXTENSIONS)} files.'
    )
  images = []
  for f in files:
    image = custom_data.decode_image(f)  # DatasetError naming the file.
    if image.shape[-1] in (2, 4):
      image = image[..., :-1]
    images.append(image)
  sizes = {im.shape for im in images}
  if len(sizes) == 1:
    return np.stack(images)
  # Mixed sizes: each image alone to one common size (the first's), then stacked.
  h, w, c = images[0].shape
  return np.stack(
    [
      np.round(
        out_datasets.to_image_shape(im.astype(np.float32) / 255.0, (h, w, c)).numpy() * 255
      ).astype(np.uint8)
      for im in images
    ]
  )


def _tfds_images(name, data_dir):
  try:
    ds = input_pipeline.load_split(name, 'train', data_dir=data_dir)
  except input_pipeline.DatasetUnavailableError:
    raise
  except Exception as e:  # An unknown TFDS name raises from deep inside TFDS.
    raise OutlierDataError(
      f'outlier source {name!r} is not a TFDS dataset, photos, noise, folder:PATH or npz:PATH '
      f'({type(e).__name__}: {e}).'
    ) from e
  images = [x for x, _ in ds.take(MAX_IMAGES).as_numpy_iterator()]
  return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.float32)
