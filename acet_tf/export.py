"""Exports a trained run as a SavedModel that abstains below a confidence threshold.

  python -m acet_tf.export --workdir=runs/mnist5k_acet --export_dir=exports/mnist5k_acet \
      --threshold=auto

A thin binary: flags -> exporter.export_model (acet_tf/exporting/exporter.py says what is written).
"""

import json

from absl import app
from absl import flags

from acet_tf.exporting import exporter

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'The run to export (its config.json and latest checkpoint).'
)
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'Base directory; versions go below it.')
_VERSION = flags.DEFINE_integer('version', None, 'Version number; default: the next integer.')
_THRESHOLD = flags.DEFINE_string('threshold', 'auto', "'auto' or a float in [0, 1].")
_KEEP = flags.DEFINE_float('keep', 0.95, "Share of correct test points 'auto' keeps accepted.")
_NUM_EXAMPLES = flags.DEFINE_integer(
  'num_examples',
  None,
  'Test points (and noise images made from them) for calibration and '
  'accept rates; default: config.eval.max_examples.',
)
_ADV_NOISE_EXAMPLES = flags.DEFINE_integer(
  'adv_noise_examples',
  None,
  'Adversarial noise images for the accept rate (PGD with the '
  "config's eval.adv_noise_* settings); default: config.eval.adv_noise_examples; 0 skips it.",
)
_DEMO_REQUEST = flags.DEFINE_string(
  'demo_request',
  None,
  'Also write a REST request JSON with --demo_examples test images, '
  'noise and adversarial noise images, for tools/client.py.',
)
_DEMO_EXAMPLES = flags.DEFINE_integer('demo_examples', 5, 'Images of each kind in --demo_request.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value or not _EXPORT_DIR.value:
    raise app.UsageError('--workdir and --export_dir are required.')
  path, metadata = exporter.export_model(
    _WORKDIR.value,
    _EXPORT_DIR.value,
    version=_VERSION.value,
    threshold=_THRESHOLD.value,
    keep=_KEEP.value,
    num_examples=_NUM_EXAMPLES.value,
    adv_noise_examples=_ADV_NOISE_EXAMPLES.value,
    demo_request_path=_DEMO_REQUEST.value,
    demo_examples=_DEMO_EXAMPLES.value,
  )
  print(
    json.dumps(
      {
        'export': path,
        'threshold': metadata['threshold']['value'],
        'accept_rates': metadata['threshold']['accept_rates'],
      },
      indent=2,
    )
  )


if __name__ == '__main__':
  app.run(main)
