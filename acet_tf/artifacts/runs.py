"""The run directory: the one place that knows its layout (as export_layout.py is for exports).

WORKDIR/config.json           the full config of the run
WORKDIR/checkpoints/ckpt-N    the latest few checkpoints; N is the step
WORKDIR/final_metrics.json    the metrics at the end of training
WORKDIR/source.json           where an imported run's weights came from (import_reference)
WORKDIR/eval/                 acet_tf.evaluate's default output
"""

import json
import os
import re

import ml_collections
import tensorflow as tf

from acet_tf import models
from acet_tf.data import input_pipeline
from acet_tf.data import known_datasets

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
FINAL_METRICS = 'final_metrics.json'
SOURCE = 'source.json'
EVAL = 'eval'

# Keys that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = (
  'log_every_steps',
  'checkpoint_every_steps',
  'max_checkpoints',
  'eval',
  'num_summary_images',
  'steps_per_call',
  'strategy',
  'tpu_address',
  'jit_compile',
  'data_dir',
)
# Keys added after runs were first made; a saved config without one had this value.
ADDED_KEYS = {
  'image_size': 0,
  'channels': 0,
  'test_fraction': 0.2,
  'out_data': {'sources': ['noise'], 'shares': [1.0], 'num_photos': 20_000},
}


def checkpoint_dir(workdir):
  return os.path.join(workdir, CHECKPOINTS)


def write_json(path, data):
  """Writes `data` as JSON atomically (a reader never sees half a file)."""
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(workdir, name, *, required=True):
  """WORKDIR/name as a dict; None if absent and not `required`."""
  path = os.path.join(workdir, name)
  if not tf.io.gfile.exists(path):
    if required:
      raise FileNotFoundError(
        f'No {name} in {workdir}: is it an acet_tf run directory (made by '
        'acet_tf.train or acet_tf.import_reference)?'
      )
    return None
  with tf.io.gfile.GFile(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e


def read_config(workdir):
  """The run's config.json as a ConfigDict, keys added since it was written at their old values."""
  return ml_collections.ConfigDict(dict(ADDED_KEYS, **read_json(workdir, CONFIG)))


def write_config(workdir, config):
  write_json(os.path.join(workdir, CONFIG), json.loads(config.to_json()))


def check_resumable(config, workdir):
  """Refuses to continue a run in `workdir` that was trained with other hyperparameters."""
  saved = read_json(workdir, CONFIG, required=False)
  if saved is None:
    return
  saved = dict(ADDED_KEYS, **saved)
  current = json.loads(config.to_json())
  changed = sorted(
    k
    for k in set(saved) | set(current)
    if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)
  )
  if changed:
    raise ValueError(
      f'{workdir} holds a run with a different config (keys {changed}); resuming it would mix '
      f'two experiments. Use another --workdir, or delete {workdir} to start over.'
    )


def checkpoint_step(path):
  """The step N of a checkpoint path .../ckpt-N."""
  match = re.search(r'-(\d+)$', path)
  if not match:
    raise ValueError(f'Checkpoint path {path} does not end in -<step>.')
  return int(match.group(1))


def latest_checkpoint(workdir):
  latest = tf.train.latest_checkpoint(checkpoint_dir(workdir))
  if latest is None:
    raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)}: train first.')
  return latest


def restore_checkpoint(checkpoint, path, config, info, *, partial=False):
  """Restores `path` into `checkpoint`, explaining a mismatch in terms of the config.

  partial=True: the checkpoint may hold objects `checkpoint` lacks (an optimizer's slots).
  """
  try:
    status = checkpoint.restore(path)
    if partial:
      status = status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as e:
    raise ValueError(
      f'Checkpoint {path} does not fit model {config.model} for dataset {config.dataset} '
      f'(images {tuple(info.image_shape)}, {info.num_classes} classes): {e}'
    ) from e


def restore_model(workdir, config=None):
  """The model of the latest checkpoint in `workdir` (weights and batch-norm statistics only).

  Returns (model, config, info, step): model as trained (for prood the models.ProodModel of
  classifier and discriminator); config is the one saved in the run unless given; info the
  dataset's DatasetInfo (when the data is not on this machine, its recorded shape and classes with
  info.has_data=False, logged: see known_datasets); step the checkpoint's. No optimizer is built;
  its slots are not read.
  """
  if config is None:
    config = read_config(workdir)
  info = known_datasets.info_or_recorded(
    config.dataset, config.data_dir or None, input_pipeline.options_from_config(config)
  )
  model = models.model_for_config(config, info.image_shape, info.num_classes)
  latest = latest_checkpoint(workdir)
  restore_checkpoint(tf.train.Checkpoint(model=model), latest, config, info, partial=True)
  return model, config, info, checkpoint_step(latest)


def restore_classifier(classifier, workdir, config):
  """Restores the classifier of the run in `workdir` into `classifier` (ProoD's frozen one).

  Refuses, naming both, a run of another dataset or model, or a ProoD run (its checkpoint holds
  a joint model). Returns the run's checkpoint step.
  """
  source = read_config(workdir)
  if source.method == 'prood':
    raise ValueError(
      f'classifier_workdir {workdir} is a prood run; give a run of a classifier (plain, ceda, ...).'
    )
  if (source.dataset, source.model) != (config.dataset, config.model):
    raise ValueError(
      f'classifier_workdir {workdir} trained {source.model} on {source.dataset}, but this run '
      f'has model {config.model} on {config.dataset}: they must agree.'
    )
  latest = latest_checkpoint(workdir)
  try:
    tf.train.Checkpoint(model=classifier).restore(
      latest
    ).expect_partial().assert_existing_objects_matched()
  except (AssertionError, ValueError) as e:
    raise ValueError(f'Checkpoint {latest} does not fit classifier {config.model}: {e}') from e
  return checkpoint_step(latest)
