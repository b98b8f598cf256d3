"""Trains a plain, CEDA or ACET classifier; resumes by itself from its workdir.

  python -m acet_tf.train --config=configs/mnist5k.py:acet --workdir=runs/mnist5k_acet

A thin binary: it parses flags and calls trainer.train_and_evaluate(config, workdir).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from acet_tf import config_files
from acet_tf.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file and argument.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries, metrics.')


def main(argv, hooks=()):
  """`hooks` are passed to train_and_evaluate (tests start the binary with fault hooks)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required.')
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, hooks=hooks)


if __name__ == '__main__':
  app.run(main, argv=config_files.resolve_argv(sys.argv))
