"""Table 1 and Table 2 of the paper for a trained run or an exported SavedModel, with plots.

  python -m acet_tf.evaluate --workdir=runs/mnist5k_acet
  python -m acet_tf.evaluate --workdir=runs/mnist5k_acet --max_examples=500 --table2_examples=1000
  python -m acet_tf.evaluate --workdir=runs/mnist5k_acet --config=configs/eval.py:strong
  python -m acet_tf.evaluate --saved_model=exports/mnist5k_acet --output_dir=/tmp/eval_export
  python -m acet_tf.evaluate --keras_model=model.keras --dataset=mnist5k --output_dir=/tmp/eval_k

A thin binary: flags (or an evaluation config, configs/eval.py) -> settings_lib.Settings ->
evaluator.evaluate_run (see acet_tf/evaluation/evaluator.py for what it writes); a .keras file
saved from model.fit (acet_tf.keras.OutlierAwareModel, or any classifier of logits) goes through
acet_tf.keras.evaluate.
"""

import sys

from absl import app
from absl import flags
import keras
from ml_collections import config_flags

from acet_tf import config_files
from acet_tf import keras as acet_keras
from acet_tf.data import out_datasets
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import reporting
from acet_tf.evaluation import settings as settings_lib

_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'The run to evaluate (its config.json and latest checkpoint); default output WORKDIR/eval.',
)
_SAVED_MODEL = flags.DEFINE_string(
  'saved_model',
  None,
  'Evaluate this SavedModel export instead of the checkpoint (a version '
  'directory, or an export directory whose newest version is used).',
)
_KERAS_MODEL = flags.DEFINE_string(
  'keras_model',
  None,
  'Evaluate this .keras file (model.save of an acet_tf.keras.OutlierAwareModel or of a '
  'classifier of logits) on --dataset; needs --output_dir.',
)
_DATASET = flags.DEFINE_string(
  'dataset',
  None,
  'In-distribution dataset of --keras_model, or of --saved_model when '
  'neither --workdir nor the export metadata names it.',
)
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where to write; default WORKDIR/eval.')
_SETS = flags.DEFINE_list(
  'sets',
  [],
  'Sets to evaluate (default all): noise, adv_noise, adv_samples, table2, datasets '
  f'(the default out-datasets) or out-dataset names ({", ".join(out_datasets.OUT_SETS)}).',
)
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', None, 'Caps every set (quick runs).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 500, 'Images per compiled call.')
_ADV_NOISE_STEPS = flags.DEFINE_integer('adv_noise_steps', 200, 'PGD steps on noise.')
_ADV_NOISE_RESTARTS = flags.DEFINE_integer(
  'adv_noise_restarts', 1, "PGD random restarts on noise (> 1: a stronger attack than the paper's)."
)
_ADV_SAMPLES_STEPS = flags.DEFINE_integer('adv_samples_steps', 80, 'PGD steps on test images.')
_TABLE2_EXAMPLES = flags.DEFINE_integer(
  'table2_examples',
  None,
  'Uniform draws for Table 2; default 10,000, or --max_examples if that is smaller.',
)
_STRICT = flags.DEFINE_bool(
  'strict', False, 'Fail instead of skipping an out-set that cannot be loaded.'
)
_IMAGENET_MINUS_DIR = flags.DEFINE_string('imagenet_minus_dir', '', 'Folder of ImageNet- images.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "TFDS data_dir; default the run's.")
_SEED = flags.DEFINE_integer('seed', None, "Evaluation seed; default the run's config.seed.")
_IMAGE_DIRS = flags.DEFINE_list(
  'image_dirs',
  [],
  'Folders of images as out-sets: name=folder,... '
  '(use the name in --sets; resized and converted like the others).',
)
_EVAL_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Evaluation config, configs/eval.py:paper|quick|strong[,runlocal]; fields '
  'overridable as --config.x=...; the flags above override it when given.',
)

# Flag name -> Settings field, for the flags that override an evaluation config when given.
_OVERRIDES = {
  'sets': 'sets',
  'max_examples': 'max_examples',
  'batch_size': 'batch_size',
  'adv_noise_steps': 'adv_noise_steps',
  'adv_noise_restarts': 'adv_noise_restarts',
  'adv_samples_steps': 'adv_samples_steps',
  'table2_examples': 'table2_examples',
  'strict': 'strict',
  'data_dir': 'data_dir',
  'imagenet_minus_dir': 'imagenet_minus_dir',
  'seed': 'seed',
  'image_dirs': 'image_dirs',
}


def _flag_value(name):
  value = flags.FLAGS[name].value
  if name == 'sets':
    return tuple(value)
  if name == 'image_dirs':
    return settings_lib.parse_image_dirs(value)
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(_WORKDIR.value or _SAVED_MODEL.value) == bool(_KERAS_MODEL.value):
    raise app.UsageError('Give --workdir or --saved_model (or both), or --keras_model.')
  if _KERAS_MODEL.value and not (_DATASET.value and _OUTPUT_DIR.value):
    raise app.UsageError('--keras_model needs --dataset and --output_dir.')
  if _EVAL_CONFIG.value is not None:
    given = {
      field: _flag_value(name) for name, field in _OVERRIDES.items() if flags.FLAGS[name].present
    }
    settings = settings_lib.settings_from_config(_EVAL_CONFIG.value, **given)
  else:  # Today's flags alone: the paper's protocol.
    settings = settings_lib.Settings(
      **{field: _flag_value(name) for name, field in _OVERRIDES.items()}
    )
  if _KERAS_MODEL.value:
    results = acet_keras.evaluate(
      keras.models.load_model(_KERAS_MODEL.value),
      settings,
      dataset=_DATASET.value,
      output_dir=_OUTPUT_DIR.value,
    )
  else:
    results = evaluator.evaluate_run(
      settings,
      workdir=_WORKDIR.value,
      saved_model=_SAVED_MODEL.value,
      dataset=_DATASET.value,
      output_dir=_OUTPUT_DIR.value,
    )
  print(reporting.format_table(results))


if __name__ == '__main__':
  app.run(main, argv=config_files.resolve_argv(sys.argv))
