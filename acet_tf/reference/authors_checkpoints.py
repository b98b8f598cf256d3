"""The authors' TF 1 checkpoints (github max-andr/relu_networks_overconfident) as acet_tf models.

The reference names its variables by TF 1 variable scopes (its models.py); this module maps them
onto the Keras layers of `models.preact_resnet` (the reference's "resnet_small") and `models.lenet`:

  resnet_small                                               preact_resnet
  block_init/conv/weights                                    stem_conv/kernel
  block_<s>_<u>/shared_activation/batch_normalization/*      stage<s>_unit<u+1>_bn1/*   (u = 0)
  block_<s>_<u>/residual_only_activation/batch_normalization/*  stage<s>_unit<u+1>_bn1/* (u > 0)
  block_<s>_<u>/sub1/conv1/weights                           stage<s>_unit<u+1>_conv1/kernel
  block_<s>_<u>/sub2/batch_normalization/*                   stage<s>_unit<u+1>_bn2/*
  block_<s>_<u>/sub2/conv2/weights                           stage<s>_unit<u+1>_conv2/kernel
  unit_last/batch_normalization/*                            final_bn/*
  logit/fc/{weights,biases}                                  logits/{kernel,bias}

  lenet: conv1/conv1/{weights,biases}, conv2/conv2/..., fc1/..., fc2/... -> conv1, conv2, fc1,
  logits (kernel, bias). Batch norm: gamma, beta, moving_mean, moving_variance, same names.

Kernel layouts agree (conv HWIO, dense [in, out], LeNet's flatten in NHWC order), so values are
copied unchanged. Optimizer slots and the step counter are not model weights and are skipped.
"""

import hashlib
import re

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf import models
from acet_tf.artifacts import runs
from acet_tf.data import known_datasets

# The reference's model names -> acet_tf's (config.model).
ARCHITECTURES = {'resnet_small': 'preact_resnet', 'lenet': 'lenet'}
# The reference's dataset names (its data.py) -> acet_tf's (TFDS names).
DATASETS = {'mnist': 'mnist', 'svhn': 'svhn_cropped', 'cifar10': 'cifar10', 'cifar100': 'cifar100'}
# Not model weights: the momentum / Adam slots and the counters of the TF 1 training graph.
OPTIMIZER_SLOT_SUFFIXES = ('/Momentum', '/Adam', '/Adam_1')
COUNTERS = ('Variable', 'global_step', 'beta1_power', 'beta2_power')
STEP_VARIABLE = 'Variable'  # The reference's global step (int32 []): 39,000 for 100 CIFAR epochs.

_BN = ('gamma', 'beta', 'moving_mean', 'moving_variance')
_RESNET_UNIT = re.compile(r'stage(\d+)_unit(\d+)_(bn1|conv1|bn2|conv2)$')


class MismatchError(ValueError):
  """The checkpoint does not fit the model; the message lists every offending variable."""


# ------------------------------------------------------------------------------------------------
# The authors' run names.
# ------------------------------------------------------------------------------------------------


def parse_run_name(name):
  """Reads dataset, model and method from one of the authors' run-folder names.

  Args:
    name: e.g. '2019-04-03 16:24:31_dataset=cifar10 model=resnet_small p_norm=inf lmbd=0.0005
      at_frac=1.0 pgd_eps=0.3 pgd_niter=40 frac_perm=0.5 loss=max_conf' (the authors' checkpoint
      files are named '<run name>-<epoch>' inside '<run name>/models/').

  Returns:
    {'fields': {key: value str}, 'dataset': acet_tf dataset, 'model': acet_tf model name,
    'method': 'plain' (at_frac=0), 'ceda' (at_frac>0, pgd_niter=0) or 'acet' (pgd_niter>0)}.

  Raises:
    ValueError: the name lacks dataset, model, at_frac or pgd_niter, or names an unknown one.
  """
  # Keys start the name, follow a space, or follow the time stamp ('..09:02:11_dataset=').
  fields = dict(re.findall(r'(?:^|\s|(?<=\d)_)([a-z][a-z_]*)=(\S+)', name))
  missing = [k for k in ('dataset', 'model', 'at_frac', 'pgd_niter') if k not in fields]
  if missing:
    raise ValueError(
      f"{name!r} is not one of the authors' run names (no {'=, '.join(missing)}=); "
      'pass --dataset and --method.'
    )
  if fields['dataset'] not in DATASETS:
    raise ValueError(
      f'Run {name!r}: unknown dataset {fields["dataset"]!r}; known: {", ".join(DATASETS)}.'
    )
  if fields['model'] not in ARCHITECTURES:
    raise ValueError(
      f'Run {name!r}: unknown model {fields["model"]!r}; known: {", ".join(ARCHITECTURES)}.'
    )
  try:
    at_frac, pgd_niter = float(fields['at_frac']), int(fields['pgd_niter'])
  except ValueError as e:
    raise ValueError(f'Run {name!r}: at_frac / pgd_niter are not numbers: {e}') from e
  method = 'plain' if at_frac == 0 else ('acet' if pgd_niter > 0 else 'ceda')
  return {
    'fields': fields,
    'dataset': DATASETS[fields['dataset']],
    'model': ARCHITECTURES[fields['model']],
    'method': method,
  }


def run_name_of(checkpoint):
  """The authors' run name from a checkpoint path, or None if the path does not carry one.

  Their layout is '<run name>/models/<run name>-<epoch>'; the file name is tried first, then the
  folder above 'models'.
  """
  path = checkpoint.rstrip('/')
  candidates = [re.sub(r'-\d+$', '', path.rsplit('/', 1)[-1])]
  parts = path.split('/')
  if len(parts) >= 3 and parts[-2] == 'models':
    candidates.append(parts[-3])
  for name in candidates:
    try:
      parse_run_name(name)
      return name
    except ValueError:
      continue
  return None


def resolve(checkpoint, dataset=None, method=None, run_name=None):
  """(dataset, method, run name or None) of an import: as given, else from the authors' run name.

  `dataset` may be the reference's name ('svhn') or acet_tf's ('svhn_cropped'). A given value that
  contradicts the run name is an error, and so is a value that neither gives nor implies.
  """
  run_name = run_name or run_name_of(checkpoint)
  parsed = parse_run_name(run_name) if run_name else None
  if dataset is not None:
    dataset = DATASETS.get(dataset, dataset)
  for key, given in (('dataset', dataset), ('method', method)):
    if parsed and given and parsed[key] != given:
      raise ValueError(f'--{key}={given} but the run name {run_name!r} says {parsed[key]}.')
  dataset = dataset or (parsed and parsed['dataset'])
  method = method or (parsed and parsed['method'])
  if not dataset or not method:
    raise ValueError(
      f"{checkpoint} is not in a folder named like the authors' runs "
      '(<run name>/models/<run name>-<epoch>): pass --dataset and --method (or '
      '--run_name).'
    )
  return dataset, method, run_name


# ------------------------------------------------------------------------------------------------
# Reading and mapping.
# ------------------------------------------------------------------------------------------------


def is_model_weight(name):
  """False for optimizer slots and counters, which the import skips."""
  return name not in COUNTERS and not name.endswith(OPTIMIZER_SLOT_SUFFIXES)


def read_checkpoint(checkpoint):
  """Every variable of a TF 1 checkpoint prefix (e.g. DIR/model-100).

  Returns:
    (weights {name: numpy array} of the model weights, step int or None (the reference's global
    step counter), skipped: sorted names of the optimizer slots and counters left out).
  """
  try:
    reader = tf.train.load_checkpoint(checkpoint)
  except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as e:
    raise FileNotFoundError(
      f'Cannot read a TF checkpoint at {checkpoint!r} (give the prefix, '
      f'e.g. DIR/model-100, without .index): {e}'
    ) from e
  names = sorted(reader.get_variable_to_shape_map())
  weights = {n: reader.get_tensor(n) for n in names if is_model_weight(n)}
  step = int(reader.get_tensor(STEP_VARIABLE)) if STEP_VARIABLE in names else None
  return weights, step, [n for n in names if not is_model_weight(n)]


def architecture_of(names):
  """'resnet_small' or 'lenet' from the variable names; ValueError if neither."""
  names = set(names)
  if 'block_init/conv/weights' in names:
    return 'resnet_small'
  if 'conv1/conv1/weights' in names:
    return 'lenet'
  shown = ', '.join(sorted(names)[:8])
  raise ValueError(
    f"Unknown architecture: the checkpoint has neither the reference's "
    f'resnet_small (block_init/conv/weights) nor its lenet (conv1/conv1/weights); '
    f'its variables begin {shown}{", ..." if len(names) > 8 else ""}.'
  )


def _layer_variables(layer):
  """{short name: variable} of a Keras layer's weights (kernel, bias, gamma, ...)."""
  return {v.path.rsplit('/', 1)[-1]: v for v in layer.weights}


def reference_names(model, architecture):
  """{reference variable name: Keras variable} for every weight of `model`.

  Args:
    model: a Keras model from models.create_model ('preact_resnet' for resnet_small, 'lenet').
    architecture: 'resnet_small' or 'lenet'.

  Raises:
    MismatchError: the model has a weighted layer the reference architecture does not (e.g. a
      1x1 shortcut convolution, or another model altogether).
  """
  if architecture not in ARCHITECTURES:
    raise ValueError(f'Unknown architecture {architecture!r}; known: {", ".join(ARCHITECTURES)}.')
  table, unknown = {}, []
  for layer in model.layers:
    variables = _layer_variables(layer)
    if not variables:
      continue
    scope = _scope(layer.name, architecture)
    if scope is None:
      shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in variables.items())
      unknown.append(f'{layer.name} ({shapes})')
      continue
    for short, variable in variables.items():
      table[f'{scope}/{_TF1_NAMES.get(short, short)}'] = variable
  if unknown:
    raise MismatchError(
      f"Model {model.name} has layers with no counterpart in the reference's "
      f'{architecture}: {"; ".join(unknown)}.'
    )
  return table


_TF1_NAMES = {'kernel': 'weights', 'bias': 'biases'}


def _scope(layer_name, architecture):
  """The reference's variable scope of a Keras layer, or None if it has none."""
  if architecture == 'lenet':
    return {'conv1': 'conv1/conv1', 'conv2': 'conv2/conv2', 'fc1': 'fc1', 'logits': 'fc2'}.get(
      layer_name
    )
  fixed = {
    'stem_conv': 'block_init/conv',
    'final_bn': 'unit_last/batch_normalization',
    'logits': 'logit/fc',
  }
  if layer_name in fixed:
    return fixed[layer_name]
  match = _RESNET_UNIT.match(layer_name)
  if not match:
    return None
  stage, unit, part = int(match.group(1)), int(match.group(2)) - 1, match.group(3)
  block = f'block_{stage}_{unit}'
  if part == 'bn1':
    # The first unit of a stage shares its pre-activation with the shortcut.
    return (
      f'{block}/{"shared_activation" if unit == 0 else "residual_only_activation"}/'
      'batch_normalization'
    )
  return {
    'conv1': f'{block}/sub1/conv1',
    'bn2': f'{block}/sub2/batch_normalization',
    'conv2': f'{block}/sub2/conv2',
  }[part]


def check_fits(weights, table):
  """Raises MismatchError listing every missing, extra and misshapen variable (both shapes)."""
  problems = []
  for name in sorted(set(table) - set(weights)):
    problems.append(
      f'missing: {name} (model {table[name].path}, shape '
      f'{tuple(table[name].shape)}) is not in the checkpoint'
    )
  for name in sorted(set(weights) - set(table)):
    problems.append(
      f'extra: {name} (checkpoint shape {tuple(weights[name].shape)}) has no place in the model'
    )
  for name in sorted(set(weights) & set(table)):
    want, got = tuple(table[name].shape), tuple(weights[name].shape)
    if want != got:
      problems.append(
        f'shape: {name} has shape {got} in the checkpoint, the model '
        f'({table[name].path}) expects {want}'
      )
  if problems:
    raise MismatchError(
      f'The checkpoint does not fit the model ({len(problems)} problems):\n  '
      + '\n  '.join(problems)
    )


def load_into(model, weights, architecture):
  """Checks that `weights` fit `model` exactly, then assigns them (else assigns nothing)."""
  table = reference_names(model, architecture)
  check_fits(weights, table)
  for name, variable in table.items():
    variable.assign(np.asarray(weights[name], dtype=variable.dtype))


def weights_sha256(weights):
  """sha256 over the imported tensors: sorted names, dtypes, shapes and little-endian bytes."""
  h = hashlib.sha256()
  for name in sorted(weights):
    value = np.ascontiguousarray(weights[name])
    h.update(f'{name}|{value.dtype.str}|{value.shape}\n'.encode())
    h.update(value.astype(value.dtype.newbyteorder('<')).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# The import.
# ------------------------------------------------------------------------------------------------


def file_sha256(path):
  h = hashlib.sha256()
  with tf.io.gfile.GFile(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def import_checkpoint(
  checkpoint: str,
  workdir: str,
  config: ml_collections.ConfigDict,
  *,
  run_name: str | None = None,
  config_source: str | None = None,
) -> tuple[keras.Model, int, str]:
  """Imports the TF 1 checkpoint `checkpoint` into a new acet_tf run directory `workdir`.

  Writes (artifacts/runs.py's layout) config.json (`config`), checkpoints/ckpt-<step> (a
  tf.train.Checkpoint(model=...) with the model's weights and batch-norm statistics; step = the
  reference's global step) and source.json (paths, run name, sha256 of the imported weights and
  of the checkpoint files). Nothing is written unless every variable fits.

  Args:
    checkpoint: the reference's checkpoint prefix, e.g. DIR/model-100.
    workdir: a directory without a run in it.
    config: the paper's config for the dataset and method (config.model must be 'preact_resnet'
      or 'lenet', matching the checkpoint's architecture).
    run_name: the authors' run name, if known (recorded in source.json).
    config_source: how `config` was made (recorded in source.json).

  Returns:
    (the Keras model with the imported weights, step, path of the written checkpoint).
  """
  weights, step, skipped = read_checkpoint(checkpoint)
  architecture = architecture_of(weights)
  if ARCHITECTURES[architecture] != config.model:
    raise MismatchError(
      f"The checkpoint holds the reference's {architecture} (acet_tf "
      f'{ARCHITECTURES[architecture]!r}) but config.model is {config.model!r}.'
    )
  info = known_datasets.info_or_recorded(config.dataset, config.data_dir or None)
  model = models.create_model(config.model, info.image_shape, info.num_classes)
  load_into(model, weights, architecture)  # Raises before anything is written.
  step_source = f"the checkpoint's global step ({STEP_VARIABLE!r})"
  if step is None:
    step_source = 'the number at the end of the checkpoint name (no step counter in it)'
    match = re.search(r'-(\d+)$', checkpoint)
    step = int(match.group(1)) if match else 0
  if tf.io.gfile.exists(runs.checkpoint_dir(workdir)) or tf.io.gfile.exists(
    f'{workdir}/{runs.CONFIG}'
  ):
    raise FileExistsError(f'{workdir} already holds a run; import into a new directory.')
  tf.io.gfile.makedirs(workdir)
  runs.write_config(workdir, config)
  manager = tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model), runs.checkpoint_dir(workdir), max_to_keep=1
  )
  path = manager.save(checkpoint_number=step)
  files = sorted(tf.io.gfile.glob(checkpoint + '.*'))
  runs.write_json(
    f'{workdir}/{runs.SOURCE}',
    {
      'checkpoint': checkpoint,
      'run_name': run_name,
      'architecture': architecture,
      'step': step,
      'step_source': step_source,
      'weights_sha256': weights_sha256(weights),
      'weights_sha256_rule': weights_sha256.__doc__,
      'files_sha256': {
        f.rsplit('/', 1)[-1]: file_sha256(f) for f in files if not f.endswith('.meta')
      },
      'num_variables': len(weights),
      'skipped': {
        'counters': [n for n in skipped if n in COUNTERS],
        'optimizer_slots': sum(n not in COUNTERS for n in skipped),
      },
      'config_source': config_source,
      'dataset_available': info.has_data,
    },
  )
  return model, step, path
