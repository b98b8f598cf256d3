"""The tf.distribute strategy named in the config."""
import json
import os

from absl import logging
import tensorflow as tf

STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker', 'tpu')


def create_strategy(name, tpu_address=''):
  """Returns the strategy for `name`.

  auto: MirroredStrategy over all local GPUs if there are any, else the one device.
  mirrored: MirroredStrategy over all local GPUs (or all logical CPUs when there are no GPUs,
    which is how the tests exercise it).
  multi_worker: MultiWorkerMirroredStrategy, cluster from the TF_CONFIG environment variable.
  tpu: TPUStrategy on `tpu_address` (code path only; untested here).
  """
  if name not in STRATEGIES:
    raise ValueError(f'config.strategy must be one of {STRATEGIES}, got {name!r}')
  gpus = tf.config.list_logical_devices('GPU')
  if name == 'auto':
    name = 'mirrored' if gpus else 'one_device'
  if name == 'one_device':
    device = gpus[0].name if gpus else tf.config.list_logical_devices('CPU')[0].name
    strategy = tf.distribute.OneDeviceStrategy(device)
  elif name == 'mirrored':
    devices = [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))]
    strategy = tf.distribute.MirroredStrategy(devices)
  elif name == 'multi_worker':
    if 'TF_CONFIG' not in os.environ:
      raise ValueError('strategy multi_worker needs the TF_CONFIG environment variable '
                       '(see README "Several machines").')
    json.loads(os.environ['TF_CONFIG'])  # Fail here, clearly, on malformed JSON.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    strategy = tf.distribute.TPUStrategy(resolver)
  logging.info('Strategy %s with %d replicas.', type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy


def is_chief(strategy):
  """True on the one worker that writes summaries, the config and exports."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  return resolver.task_type == 'chief' or (
      resolver.task_type == 'worker' and resolver.task_id == 0 and
      'chief' not in resolver.cluster_spec().as_dict())
