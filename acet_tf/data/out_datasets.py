"""The out-distribution datasets of Table 1, per in-distribution dataset
(docs/recipe.md "Evaluation").

MNIST (and the offline mnist5k) -> FMNIST, EMNIST letters, grayCIFAR-10; SVHN -> CIFAR-10,
CIFAR-100, LSUN classroom, ImageNet-; CIFAR-10 -> SVHN, CIFAR-100, LSUN classroom, ImageNet-;
CIFAR-100 -> SVHN, CIFAR-10, LSUN classroom, ImageNet-.

Every out-set is brought to the in-distribution image shape the way the reference did it: a
bilinear (antialiased) resize to H x W without keeping the aspect ratio, then the mean over the
colour channels for a grey in-distribution (so CIFAR-10 for MNIST is "grayCIFAR-10" at 28x28). A
set that is not on disk and cannot be downloaded raises input_pipeline.DatasetUnavailableError;
load_out_sets skips it (or, strict, raises).
"""

import dataclasses
import importlib.util
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf.data import custom_data
from acet_tf.data import input_pipeline

# The reference took 10,000 images of the LSUN classroom training split (its test split has 300)
# and 10,000 random images of its ImageNet- folder.
LARGE_SET_CAP = 10_000
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


@dataclasses.dataclass(frozen=True)
class OutSet:
  key: str  # Name in results.json, TensorBoard and --sets.
  title: str  # Row label in table.md (the paper's spelling).
  tfds_name: str  # '' for a local image folder.
  split: str
  cap: int | None = None  # Default number of images when --max_examples is not given.


OUT_SETS = {
  s.key: s
  for s in (
    OutSet('fmnist', 'FMNIST', 'fashion_mnist', 'test'),
    OutSet('emnist', 'EMNIST (letters)', 'emnist/letters', 'test'),
    OutSet('gray_cifar10', 'grayCIFAR-10', 'cifar10', 'test'),
    OutSet('svhn', 'SVHN', 'svhn_cropped', 'test'),
    OutSet('cifar10', 'CIFAR-10', 'cifar10', 'test'),
    OutSet('cifar100', 'CIFAR-100', 'cifar100', 'test'),
    OutSet('lsun_classroom', 'LSUN CR', 'lsun/classroom', 'train', LARGE_SET_CAP),
    OutSet('imagenet_minus', 'ImageNet-', '', '', LARGE_SET_CAP),
    # Offline real images: patches of the photographs bundled in the scikit-image wheel.
    OutSet('photos', 'Photo patches', '', ''),
  )
}
# Photographs in scikit-image's wheel (skimage/data/, no download): people, animals, objects,
# textures, the sky. Its synthetic test images (chessboard, colour wheel, text pages) are left out.
PHOTOS = (
  'astronaut.png',
  'brick.png',
  'camera.png',
  'chelsea.png',
  'coffee.png',
  'coins.png',
  'grass.png',
  'gravel.png',
  'hubble_deep_field.jpg',
  'moon.png',
  'motorcycle_left.png',
  'rocket.jpg',
)
PHOTO_PATCH_SIZES = (64, 128)  # Square patches cut at the photos' own resolution, no overlap.
# Sets read from a folder of images: ImageNet- and any --image_dirs=name=path entry.
FOLDER_SETS = ('imagenet_minus',)

_MNIST_OUT = ('fmnist', 'emnist', 'gray_cifar10')
DEFAULT_OUT_SETS = {
  'mnist': _MNIST_OUT,
  input_pipeline.MNIST5K: _MNIST_OUT,
  'svhn_cropped': ('cifar10', 'cifar100', 'lsun_classroom', 'imagenet_minus'),
  'cifar10': ('svhn', 'cifar100', 'lsun_classroom', 'imagenet_minus'),
  'cifar100': ('svhn', 'cifar10', 'lsun_classroom', 'imagenet_minus'),
}


def default_out_sets(dataset):
  """The out-set keys of Table 1 for the in-distribution `dataset` (a config.dataset name).

  None for the user's own data (folder:, npz:): which sets are out-of-distribution depends on it.
  """
  if custom_data.is_custom(dataset):
    return ()
  if dataset not in DEFAULT_OUT_SETS:
    raise ValueError(
      f'No out-distribution datasets are defined for {dataset!r} (known: '
      f'{", ".join(sorted(DEFAULT_OUT_SETS))}); choose them with --sets from '
      f'{", ".join(OUT_SETS)}.'
    )
  return DEFAULT_OUT_SETS[dataset]


def to_image_shape(images, image_shape):
  """Brings images to the in-distribution shape.

  Args:
    images: float32 [h, w, c] or [B, h, w, c] in [0, 1]; c is 1 or 3.
    image_shape: (H, W, C) with C 1 or 3.

  Returns:
    float32 [(B,) H, W, C] in [0, 1]: bilinear antialiased resize if (h, w) != (H, W) (aspect ratio
    not kept, as the reference); RGB -> grey is the channel mean, grey -> RGB repeats the channel.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  height, width, channels = image_shape
  if channels not in (1, 3):
    raise ValueError(f'Only grey (C=1) or RGB (C=3) in-distribution images, got {image_shape}.')
  if images.shape[-1] not in (1, 3):
    raise ValueError(f'Only grey or RGB out-set images, got shape {images.shape}.')
  if tuple(images.shape[-3:-1]) != (height, width):
    images = tf.image.resize(images, (height, width), method='bilinear', antialias=True)
    images = tf.clip_by_value(images, 0.0, 1.0)  # Antialiasing may overshoot slightly.
  if images.shape[-1] == 3 and channels == 1:
    images = tf.reduce_mean(images, axis=-1, keepdims=True)
  elif images.shape[-1] == 1 and channels == 3:
    images = tf.repeat(images, 3, axis=-1)
  return images


def _tfds_images(out_set, data_dir):
  """Unbatched float32 [h, w, c] images in [0, 1] of a TFDS split, in a fixed order."""
  if out_set.tfds_name == 'lsun/classroom':
    # No 'label' feature (input_pipeline.load_split needs one) and never downloaded here: TFDS
    # fetches several GB of LMDB for it and needs tensorflow-io to read them.
    try:
      builder = tfds.builder(out_set.tfds_name, data_dir=data_dir or None)
      ds = builder.as_dataset(split=out_set.split, shuffle_files=False)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
      raise input_pipeline.DatasetUnavailableError(
        f"dataset '{out_set.tfds_name}' is not prepared in "
        f'{data_dir or "~/tensorflow_datasets"}: run `tfds build {out_set.tfds_name}` (needs '
        'tensorflow-io) where there is network and copy it here, or pass --data_dir.'
      ) from e
    return ds.map(
      lambda example: tf.cast(example['image'], tf.float32) / 255.0,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
  # load_split transposes EMNIST and fails fast (DatasetUnavailableError) when offline.
  ds = input_pipeline.load_split(out_set.tfds_name, out_set.split, data_dir or None)
  return ds.map(lambda image, label: image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def image_files(folder, max_examples, seed=0):
  """Image paths under `folder` (recursive): a seeded random subset of `max_examples`, or all."""
  if not folder:
    raise input_pipeline.DatasetUnavailableError(
      'ImageNet- is not public: pass --imagenet_minus_dir=<folder of images>.'
    )
  if not tf.io.gfile.isdir(folder):
    raise input_pipeline.DatasetUnavailableError(f'image folder {folder} does not exist.')
  paths = sorted(
    os.path.join(root, name)
    for root, _, names in tf.io.gfile.walk(folder)
    for name in names
    if name.lower().endswith(IMAGE_EXTENSIONS)
  )
  if not paths:
    raise input_pipeline.DatasetUnavailableError(
      f'image folder {folder} holds no {"/".join(IMAGE_EXTENSIONS)} files.'
    )
  if max_examples is not None and max_examples < len(paths):
    chosen = np.random.default_rng(seed).choice(len(paths), max_examples, replace=False)
    paths = [paths[i] for i in sorted(chosen)]
  return paths


def skimage_data_dir():
  """The folder of scikit-image's bundled images, found without importing scikit-image."""
  spec = importlib.util.find_spec('skimage')
  if spec is None or not spec.submodule_search_locations:
    raise input_pipeline.DatasetUnavailableError(
      "the 'photos' out-set needs scikit-image (pip install -r requirements.txt)."
    )
  return os.path.join(spec.submodule_search_locations[0], 'data')


def photo_patches(seed=0):
  """Patches of PHOTOS (grey photos repeated to 3 channels), in a fixed shuffled order.

  Each photo is cut into non-overlapping squares of every size in PHOTO_PATCH_SIZES at its own
  resolution. The order is a seeded permutation, so a prefix of any length mixes all photos.

  Returns:
    A list of uint8 [p, p, 3] numpy arrays.
  """
  folder = skimage_data_dir()
  patches = []
  for name in PHOTOS:
    path = os.path.join(folder, name)
    if not tf.io.gfile.exists(path):
      raise input_pipeline.DatasetUnavailableError(
        f'{path} is missing: the installed scikit-image does not bundle {name}.'
      )
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
    for size in PHOTO_PATCH_SIZES:
      for top in range(0, image.shape[0] - size + 1, size):
        for left in range(0, image.shape[1] - size + 1, size):
          patches.append(image[top : top + size, left : left + size])
  order = np.random.default_rng(seed).permutation(len(patches))
  return [patches[i] for i in order]


def _photo_images(max_examples):
  patches = photo_patches()[:max_examples]
  # Resized here (two patch sizes cannot share one tensor); to_image_shape then only converts.
  size = PHOTO_PATCH_SIZES[0]
  resized = np.stack(
    [
      tf.image.resize(
        tf.cast(p, tf.float32) / 255.0, (size, size), method='bilinear', antialias=True
      ).numpy()
      if p.shape[0] != size
      else p / 255.0
      for p in patches
    ]
  ).astype(np.float32)
  return tf.data.Dataset.from_tensor_slices(np.clip(resized, 0.0, 1.0))


def _folder_images(folder, max_examples, seed):
  paths = image_files(folder, max_examples, seed)

  def read(path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return tf.cast(image, tf.float32) / 255.0

  return tf.data.Dataset.from_tensor_slices(paths).map(
    read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


def load_out_set(
  key,
  image_shape,
  *,
  data_dir=None,
  imagenet_minus_dir=None,
  max_examples=None,
  seed=0,
  image_dirs=None,
):
  """One out-set as unbatched images of the in-distribution shape.

  Args:
    key: one of OUT_SETS.
    image_shape: (H, W, C) of the in-distribution images.
    data_dir: TFDS data_dir ('' or None = the TFDS default).
    imagenet_minus_dir: folder of ImageNet- images (any size, jpg/png/...), for 'imagenet_minus'.
    max_examples: number of images to take; None = the whole split (LSUN and ImageNet-: 10,000).
    seed: picks the random subset of the ImageNet- folder.
    image_dirs: {key: folder of images}: any folder as an out-set (its key need not be in
      OUT_SETS); a key of OUT_SETS given here is read from the folder.

  Returns:
    A tf.data.Dataset of float32 [H, W, C] in [0, 1], in a fixed order.

  Raises:
    input_pipeline.DatasetUnavailableError: the set is not on disk and cannot be downloaded.
  """
  image_dirs = dict(image_dirs or {})
  if key == 'imagenet_minus' and imagenet_minus_dir:
    image_dirs.setdefault(key, imagenet_minus_dir)
  if key not in OUT_SETS and key not in image_dirs:
    raise ValueError(
      f'Unknown out-set {key!r}; known: {", ".join(OUT_SETS)}, or a folder given '
      'as --image_dirs=name=path.'
    )
  out_set = OUT_SETS.get(key, OutSet(key, key, '', '', LARGE_SET_CAP))
  limit = max_examples if max_examples is not None else out_set.cap
  if key in image_dirs or key in FOLDER_SETS:
    ds = _folder_images(image_dirs.get(key, ''), limit, seed)
  elif key == 'photos':
    ds = _photo_images(limit)
  elif out_set.tfds_name:
    ds = _tfds_images(out_set, data_dir)
    if limit is not None:
      ds = ds.take(limit)
  return ds.map(
    lambda image: to_image_shape(image, image_shape),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )


def load_out_sets(
  keys,
  image_shape,
  *,
  batch_size,
  data_dir=None,
  imagenet_minus_dir=None,
  max_examples=None,
  strict=False,
  seed=0,
  image_dirs=None,
):
  """Loads out-sets into memory as batches; a set that cannot be loaded is skipped (or raises).

  Loading reads every image here, so a missing, corrupt or empty set shows up now and not halfway
  through the evaluation.

  Args:
    keys: out-set keys (OUT_SETS).
    image_shape: (H, W, C) of the in-distribution images.
    batch_size: images per batch.
    data_dir, imagenet_minus_dir, max_examples, seed, image_dirs: see load_out_set.
    strict: raise instead of skipping.

  Returns:
    (sets {key: list of float32 [b, H, W, C] batches}, skipped {key: one-line reason}).
  """
  sets, skipped = {}, {}
  for key in keys:
    start = time.time()
    try:
      ds = load_out_set(
        key,
        image_shape,
        data_dir=data_dir,
        imagenet_minus_dir=imagenet_minus_dir,
        max_examples=max_examples,
        seed=seed,
        image_dirs=image_dirs,
      )
      batches = list(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))
      if not batches:
        raise input_pipeline.DatasetUnavailableError(f"out-set '{key}' has no images.")
    except (input_pipeline.DatasetUnavailableError, tf.errors.OpError, OSError) as e:
      reason = ' '.join(str(e).split()) or type(e).__name__  # One line.
      if strict:
        raise input_pipeline.DatasetUnavailableError(
          f"out-set '{key}' cannot be loaded (--strict): {reason}"
        ) from e
      logging.warning('Skipping out-set %s: %s', key, reason)
      skipped[key] = reason
      continue
    sets[key] = batches
    logging.info(
      'out-set %s: loaded %d images in %.1f s',
      key,
      sum(int(b.shape[0]) for b in batches),
      time.time() - start,
    )
  return sets, skipped
