"""Imports one of the authors' TF 1 checkpoints as an ordinary acet_tf run directory.

  python -m acet_tf.import_reference \
      --checkpoint=../shared/reference_models/cifar10_acet/model-100 \
      --dataset=cifar10 --method=acet --workdir=runs/paper_cifar10_acet

--dataset and --method may be left out when the checkpoint sits in the authors' layout
('<run name>/models/<run name>-100'), whose run name carries them. Afterwards acet_tf.evaluate,
acet_tf.export, acet_tf.serve and tools/figures.py work on --workdir as on a trained run.

The run's config.json is the paper's config for that dataset and method: the binary reads the
package's config file for the dataset (configs/<file>.py:<method>) with the same parser as
acet_tf.train's --config, so the imported run says exactly what `acet_tf.train` would have trained.
(The library may not import acet_tf.configs; a binary reading a config file by path, as train does,
keeps that rule and needs no second copy of the recipe.) --config_file picks another file.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections.config_flags import config_flags  # ConfigFileFlagParser: --config's parser.

from acet_tf import config_files
from acet_tf.reference import authors_checkpoints

# acet_tf dataset -> its config file under configs/.
CONFIG_FILES = {
  'mnist': 'mnist.py',
  'svhn_cropped': 'svhn.py',
  'cifar10': 'cifar10.py',
  'cifar100': 'cifar100.py',
}

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint',
  None,
  "The authors' checkpoint prefix, e.g. DIR/model-100 (the files DIR/model-100.index and .data-*).",
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The new run directory.')
_DATASET = flags.DEFINE_string(
  'dataset', None, 'svhn_cropped (or svhn), cifar10, cifar100 or mnist; default: from the run name.'
)
_METHOD = flags.DEFINE_enum(
  'method', None, ('plain', 'ceda', 'acet'), 'plain, ceda or acet; default: from the run name.'
)
_RUN_NAME = flags.DEFINE_string(
  'run_name',
  None,
  "The authors' run name, if the path does not "
  'carry it (recorded in source.json; also gives dataset/method).',
)
_CONFIG_FILE = flags.DEFINE_string(
  'config_file',
  None,
  'Config file to read instead of configs/<dataset>.py (the method is appended as :<method>).',
)


def paper_config(dataset, method, config_file=None):
  """The config `acet_tf.train --config=configs/<dataset file>.py:<method>` would use."""
  path = (
    config_files.resolve(config_file)
    if config_file
    else config_files.packaged(CONFIG_FILES[dataset])
  )
  spec = f'{path}:{method}'  # Read by path as train reads --config, not imported.
  config = config_flags.ConfigFileFlagParser(name='config').parse(spec)
  if config.dataset != dataset:
    raise ValueError(f'{spec} is a config for {config.dataset!r}, not {dataset!r}.')
  return config, spec


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _CHECKPOINT.value or not _WORKDIR.value:
    raise app.UsageError('--checkpoint and --workdir are required.')
  dataset, method, run_name = authors_checkpoints.resolve(
    _CHECKPOINT.value, _DATASET.value, _METHOD.value, _RUN_NAME.value
  )
  if dataset not in CONFIG_FILES and not _CONFIG_FILE.value:
    raise app.UsageError(f'No config file known for dataset {dataset!r}; pass --config_file.')
  config, spec = paper_config(dataset, method, _CONFIG_FILE.value)
  _, step, path = authors_checkpoints.import_checkpoint(
    _CHECKPOINT.value,
    _WORKDIR.value,
    config,
    run_name=run_name,
    config_source=f'{config_files.display_name(spec.rpartition(":")[0])}:{method}',
  )
  logging.info('Imported %s (%s %s, step %d) to %s', _CHECKPOINT.value, dataset, method, step, path)
  print(f'Imported {_CHECKPOINT.value} as {dataset} {method} (step {step}): {path}')


if __name__ == '__main__':
  app.run(main, argv=config_files.resolve_argv(sys.argv))
