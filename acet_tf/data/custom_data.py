"""The user's own data: a folder of images per class (`folder:PATH`) or arrays (`npz:PATH`).

Both are read whole into memory once, checked, and handed to input_pipeline as arrays, so every
problem (an unreadable image, an empty class, mixed sizes, a label out of range) is a DatasetError
naming the file before training starts, and the tf.data pipeline is the one of the TFDS datasets.

folder:PATH  One sub-folder per class (Keras' image_dataset_from_directory layout), searched
             recursively for .png/.jpg/.jpeg/.bmp/.gif (a GIF gives its first frame); other files
             are ignored. Class names are the sub-folder names, sorted. PATH/train and PATH/test
             (both) give the splits; else each class is split with a fixed seed, test_fraction of
             it (rounded; at least one image, and one left for training) going to the test split.
npz:PATH     numpy arrays x_train, y_train, x_test, y_test; images [N, H, W] or [N, H, W, C],
             uint8 in 0..255 (or another integer type in that range) or float in [0, 1]; labels
             integers [N] or [N, 1] in 0..K-1. K is len(class_names) if the file has a string array
             `class_names`, else 1 + the largest training label.

Images: alpha channels are dropped; `channels` 1 or 3 converts (RGB -> grey with ITU-R 601
weights, grey -> RGB repeats it), 0 keeps 1 if every image is grey, else 3. `image_size` S > 0
resizes every image to S x S (an area average when shrinking, bilinear when enlarging; the aspect
ratio is not kept); 0 requires all images to have one size. These are the served image_bytes
signature's rules (export.decode_images), so a file sent to the server gives exactly the training
pixels. Converted images are kept as float32, unconverted ones as uint8.
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

FOLDER_PREFIX = 'folder:'
NPZ_PREFIX = 'npz:'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
_SPLIT_SEED = 0  # The stratified split and the one-time shuffle; independent of config.seed.


class DatasetError(ValueError):
  """The user's dataset cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How a folder or npz dataset is turned into images (config keys of the same names)."""

  image_size: int = 0  # S > 0: resize to S x S; 0: keep (all images must then have one size).
  channels: int = 0  # 1 or 3; 0: 1 if every image is grey, else 3.
  test_fraction: float = 0.2  # Share of each class in the test split (folders without test/).

  def __post_init__(self):
    if self.image_size < 0:
      raise ValueError(f'image_size must be >= 0 (0 = keep the size), got {self.image_size}.')
    if self.channels not in (0, 1, 3):
      raise ValueError(f'channels must be 0 (as stored), 1 or 3, got {self.channels}.')
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f'test_fraction must be in (0, 1), got {self.test_fraction}.')


def is_custom(name):
  return name.startswith((FOLDER_PREFIX, NPZ_PREFIX))


@dataclasses.dataclass(frozen=True)
class Arrays:
  """A loaded dataset: images uint8 [N, H, W, C] (or float32 in [0, 1]), labels int32 [N]."""

  train: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]
  class_names: tuple[str, ...]


def load(name, options):
  """The Arrays of `name` ('folder:PATH' or 'npz:PATH'); cached while the files are unchanged."""
  kind, _, path = name.partition(':')
  if not path:
    raise DatasetError(f"dataset {name!r}: give a path after '{kind}:'.")
  if not os.path.exists(path):
    raise DatasetError(f'dataset {name!r}: {path} does not exist.')
  return _load_cached(kind, path, options, _fingerprint(path))


def _fingerprint(path):
  """(relative path, size, mtime) of every file below `path`: a changed file reloads."""
  if os.path.isfile(path):
    st = os.stat(path)
    return ((path, st.st_size, st.st_mtime_ns),)
  entries = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      st = os.stat(os.path.join(root, f))
      entries.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
  return tuple(entries)


@functools.lru_cache(maxsize=4)
def _load_cached(kind, path, options, fingerprint):
  del fingerprint  # Only part of the cache key.
  arrays = _load_folder(path, options) if kind == 'folder' else _load_npz(path, options)
  for split, (x, y) in (('train', arrays.train), ('test', arrays.test)):
    x.setflags(write=False)
    y.setflags(write=False)
    if not len(y):
      raise DatasetError(f'{path}: the {split} split has no images.')
  return arrays


# ------------------------------------------------------------------------------------------------
# Image conversion (shared by folders and arrays).
# ------------------------------------------------------------------------------------------------


def _drop_alpha(image):
  """[H, W, C] with C in 1..4 -> [H, W, 1 or 3]."""
  return image[..., :1] if image.shape[-1] in (1, 2) else image[..., :3]


# ITU-R BT.601 luma, as export.decode_images (the served image_bytes signature) converts.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _to_unit(image):
  """uint8 or float32 [H, W, C] -> float32 in [0, 1] (pixel / 255 for uint8)."""
  if image.dtype == np.uint8:
    return (tf.cast(image, tf.float32) / 255.0).numpy()
  return image.astype(np.float32)


def _convert(image, channels, size):
  """One image [H, W, 1 or 3] (uint8 or float32) -> `channels`, resized to size x size if > 0.

  Returned unchanged if nothing changes, else as float32 in [0, 1] (not rounded back to uint8):
  the same ops as export.decode_images, so a file sent to the served image_bytes signature gives
  exactly the pixels the model was trained on. Shrinking averages areas, enlarging is bilinear.
  """
  to_channels = image.shape[-1] != channels
  to_size = bool(size) and tuple(image.shape[:2]) != (size, size)
  if not (to_channels or to_size):
    return image
  image = tf.constant(_to_unit(image))
  if to_channels and channels == 3:
    image = tf.image.grayscale_to_rgb(image)
  elif to_channels:
    image = tf.reduce_sum(image * _GRAY_WEIGHTS, axis=-1, keepdims=True)
  if to_size:
    shrink = image.shape[0] >= size and image.shape[1] >= size
    if shrink:
      image = tf.image.resize(image, [size, size], method='area')
    else:
      image = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image.numpy()


def _convert_all(images, files, options, where):
  """Converts `images` (a list of [H, W, C]) to one array [N, S, S, C]; files name them.

  uint8 if no image needed a conversion, else float32 in [0, 1] (4 bytes a value).
  """
  images = [_drop_alpha(x) for x in images]
  channels = options.channels or (3 if any(x.shape[-1] == 3 for x in images) else 1)
  if not options.image_size:
    shapes = {}
    for x, f in zip(images, files):
      shapes.setdefault(tuple(x.shape[:2]), f)
    if len(shapes) > 1:
      (s1, f1), (s2, f2) = list(shapes.items())[:2]
      raise DatasetError(
        f'{where}: images of mixed sizes, e.g. {f1} is {s1[0]}x{s1[1]} and {f2} is '
        f'{s2[0]}x{s2[1]} (height x width); set image_size (config.image_size=S) to resize '
        'them all to S x S.'
      )
  converted = [_convert(x, channels, options.image_size) for x in images]
  if any(x.dtype != np.uint8 for x in converted):
    converted = [_to_unit(x) for x in converted]
  return np.stack(converted)


# ------------------------------------------------------------------------------------------------
# folder:PATH
# ------------------------------------------------------------------------------------------------


def _class_files(root):
  """{class name: sorted image paths} for the sub-folders of `root`, sorted by name."""
  if not os.path.isdir(root):
    raise DatasetError(f'{root} is not a folder (folder:PATH wants one sub-folder per class).')
  stray = sorted(
    f
    for f in os.listdir(root)
    if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))
  )
  if stray:
    raise DatasetError(
      f'{root} has images outside any class folder, e.g. '
      f'{os.path.join(root, stray[0])}: put each image in the sub-folder of its '
      'class.'
    )
  classes = {}
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if name.startswith('.') or not os.path.isdir(folder):
      continue
    files = []
    for parent, dirs, names in os.walk(folder):
      dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
      files += [
        os.path.join(parent, f)
        for f in sorted(names)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')
      ]
    if not files:
      raise DatasetError(
        f'class folder {folder} is empty: it has no {"/".join(IMAGE_EXTENSIONS)} '
        'files. Remove it or add images.'
      )
    classes[name] = files
  if len(classes) < 2:
    raise DatasetError(
      f'{root} has {len(classes)} class folder(s) {sorted(classes)}; a classifier '
      'needs at least 2 (one sub-folder of images per class).'
    )
  return classes


def decode_image(path):
  """uint8 [H, W, C] of an image file; DatasetError naming the file if it cannot be decoded."""
  try:
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, 'message', str(e)).splitlines()[0]
    raise DatasetError(f'cannot read image {path}: {message}') from e
  if image.dtype != tf.uint8:  # 16-bit PNGs.
    image = tf.image.convert_image_dtype(image, tf.uint8)
  return image.numpy()


def _read_classes(classes, names):
  """(images list, labels int32 [N], files) of {class: files}, labels by position in `names`."""
  images, labels, files = [], [], []
  for name, paths in classes.items():
    for p in paths:
      images.append(decode_image(p))
      labels.append(names.index(name))
      files.append(p)
  return images, np.asarray(labels, np.int32), files


def _load_folder(path, options):
  has_train, has_test = (os.path.isdir(os.path.join(path, s)) for s in ('train', 'test'))
  if has_train != has_test:
    raise DatasetError(
      f"{path} has a '{'train' if has_train else 'test'}' folder but no "
      f"'{'test' if has_train else 'train'}' folder: give both (each with one sub-folder per "
      'class), or only class folders (then a stratified split is made).'
    )
  rng = np.random.default_rng(_SPLIT_SEED)
  if has_train:
    train_classes = _class_files(os.path.join(path, 'train'))
    test_classes = _class_files(os.path.join(path, 'test'))
    names = tuple(train_classes)
    unknown = sorted(set(test_classes) - set(names))
    if unknown:
      raise DatasetError(
        f'{path}/test has class folders {unknown} that {path}/train lacks; the '
        f'training classes are {list(names)}.'
      )
  else:
    classes = _class_files(path)
    names = tuple(classes)
    train_classes, test_classes = {}, {}
    for name, files in classes.items():
      order = rng.permutation(len(files))
      # At least one test image per class that has two, and always one left for training.
      n_test = min(max(int(round(options.test_fraction * len(files))), 1), len(files) - 1)
      test_classes[name] = [files[i] for i in sorted(order[:n_test])]
      train_classes[name] = [files[i] for i in sorted(order[n_test:])]
  x_train, y_train, f_train = _read_classes(train_classes, names)
  x_test, y_test, f_test = _read_classes(test_classes, names)
  if not len(y_test):
    raise DatasetError(
      f'{path}: no image is left for the test split (every class has only one '
      'image); add images, or give train/ and test/ folders.'
    )
  x = _convert_all(x_train + x_test, f_train + f_test, options, path)
  splits = []
  for images, labels in ((x[: len(y_train)], y_train), (x[len(y_train) :], y_test)):
    # Files come sorted by class; one fixed shuffle lets any prefix (and the shuffle buffer) see
    # every class.
    order = rng.permutation(len(labels))
    splits.append((images[order], labels[order]))
  return Arrays(train=splits[0], test=splits[1], class_names=names)


# ------------------------------------------------------------------------------------------------
# npz:PATH
# ------------------------------------------------------------------------------------------------


def npz_images(path, key, x):
  """Checks and converts one image array to [N, H, W, C] uint8 or float32."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
    raise DatasetError(
      f'{path}: {key} has shape {list(x.shape)}; expected [N, H, W] or [N, H, W, C] with C in 1..4.'
    )
  if x.dtype.kind == 'f':
    if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
      raise DatasetError(
        f'{path}: {key} is float with values in [{np.nanmin(x):g}, '
        f'{np.nanmax(x):g}] or not finite; float images must be in [0, 1] '
        '(pixel / 255), or store uint8 in 0..255.'
      )
    return x.astype(np.float32)
  if x.dtype.kind in 'iu':
    if x.size and (x.min() < 0 or x.max() > 255):
      raise DatasetError(
        f'{path}: {key} has integer values in [{x.min()}, {x.max()}]; integer '
        'images must be in 0..255.'
      )
    return x.astype(np.uint8)
  raise DatasetError(
    f'{path}: {key} has dtype {x.dtype}; expected uint8 0..255 or float in [0, 1].'
  )


def _npz_labels(path, key, y, n):
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or len(y) != n:
    raise DatasetError(
      f'{path}: {key} has shape {list(y.shape)}; expected [{n}] (one integer label per image).'
    )
  if y.dtype.kind == 'f' and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
    y = y.astype(np.int64)
  if y.dtype.kind not in 'iu':
    raise DatasetError(f'{path}: {key} has dtype {y.dtype}; labels must be integers 0..K-1.')
  return y.astype(np.int64)


def _load_npz(path, options):
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:  # A missing, truncated or non-npz file: numpy raises many kinds.
    raise DatasetError(f'cannot read {path} as an .npz file: {type(e).__name__}: {e}') from e
  missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in data]
  if missing:
    raise DatasetError(f'{path} lacks the arrays {missing}; it has {sorted(data)}.')
  x_train = npz_images(path, 'x_train', data['x_train'])
  x_test = npz_images(path, 'x_test', data['x_test'])
  y_train = _npz_labels(path, 'y_train', data['y_train'], len(x_train))
  y_test = _npz_labels(path, 'y_test', data['y_test'], len(x_test))
  if not len(y_train):
    raise DatasetError(f'{path}: x_train has no images.')
  if 'class_names' in data:
    names = tuple(str(s) for s in np.asarray(data['class_names']).reshape(-1))
    source = f'class_names has {len(names)} names'
  else:
    names = tuple(str(k) for k in range(int(y_train.max()) + 1))
    source = 'no class_names array: K = 1 + the largest y_train label'
  k = len(names)
  for key, y in (('y_train', y_train), ('y_test', y_test)):
    bad = np.flatnonzero((y < 0) | (y >= k))
    if bad.size:
      raise DatasetError(
        f'{path}: {key}[{bad[0]}] = {y[bad[0]]} is out of range: labels must be '
        f'in 0..{k - 1} ({source}); {bad.size} label(s) are outside.'
      )
  counts = np.bincount(y_train, minlength=k)
  if (counts == 0).any():
    empty = int(np.flatnonzero(counts == 0)[0])
    raise DatasetError(
      f'{path}: class {empty} ({names[empty]!r}) is empty: y_train has no '
      f'label {empty}; every one of the {k} classes needs training images.'
    )
  splits = []
  for key, x, y in (('x_train', x_train, y_train), ('x_test', x_test, y_test)):
    files = [f'{path}[{key}][{i}]' for i in range(len(x))]
    if options.image_size or options.channels or x.shape[-1] in (2, 4):
      x = _convert_all(list(x), files, options, path)
    splits.append((x, y.astype(np.int32)))
  (x_train, y_train), (x_test, y_test) = splits
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DatasetError(
      f'{path}: x_train images are {list(x_train.shape[1:])} but x_test images '
      f'are {list(x_test.shape[1:])}; set image_size/channels to convert both.'
    )
  return Arrays(train=(x_train, y_train), test=(x_test, y_test), class_names=names)
