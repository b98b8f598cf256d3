"""Exports a trained run as a SavedModel that abstains below a confidence threshold (the binary
is acet_tf/export.py; this module reads no flags).

Writes TensorFlow Serving's layout, EXPORT_DIR/<version>/saved_model.pb (version: the next integer
by default), with the signatures
  serving_default  images float32 [None, H, W, C] in [0, 1]
  serving_uint8    images uint8 [None, H, W, C] in 0..255
  with_threshold   images float32 [None, H, W, C] in [0, 1], threshold float32 [] in [0, 1]
  serving_image_bytes  image_bytes string [None]: encoded PNG, JPEG, GIF or BMP files, decoded in
                   the graph (decode_images: the model's channels, its H x W, pixel / 255)
each returning probabilities float32 [None, K], confidence float32 [None] (max softmax),
predicted_class int32 [None], class_name string [None] (the name of predicted_class: the dataset's
class names, e.g. the folder names of a folder: dataset) and accepted bool [None]
(confidence >= threshold). The threshold is
the variable `threshold` of the SavedModel, changed after loading with `set_threshold(t)`; the
metadata (class names, input ranges, the threshold and how it was chosen, the accept rates, the
training config and final metrics) is the asset assets/metadata.json. The version is saved beside
its final path, marked complete (export_layout.MANIFEST, written last) and renamed into place.

The work is `export_model(...)` for a run directory, which the binary and tests call, over
`export_classifier(...)` for a Keras classifier in memory (acet_tf.keras.export).
"""

from collections.abc import Iterable
import datetime
import json
import os
import tempfile
from typing import Any

from absl import logging
import keras
import ml_collections
import tensorflow as tf

from acet_tf.artifacts import export_layout
from acet_tf.artifacts import runs
from acet_tf.artifacts import warmup
from acet_tf.data import input_pipeline
from acet_tf.evaluation import ood_metrics
from acet_tf.exporting import abstaining_classifier
from acet_tf.exporting import calibration

METADATA_FILENAME = 'metadata.json'


def _next_version(export_dir, version):
  """`version` checked to be new, or one more than the largest integer directory."""
  if version is None:
    existing = export_layout.list_versions(export_dir, complete_only=False)
    return max(existing, default=0) + 1
  if not isinstance(version, int) or isinstance(version, bool) or version < 1:
    raise ValueError(f'version must be a positive integer, got {version!r}.')
  if tf.io.gfile.exists(os.path.join(export_dir, str(version))):
    raise FileExistsError(
      f'{export_dir}/{version} exists; pick another --version or omit it to use the next free one.'
    )
  return version


def parse_threshold(value):
  """'auto' or a float in [0, 1] (string or number) -> 'auto' or float; ValueError otherwise."""
  if isinstance(value, str):
    if value.strip().lower() == 'auto':
      return 'auto'
    try:
      value = float(value)
    except ValueError:
      raise ValueError(f"threshold must be 'auto' or a float in [0, 1], got {value!r}.") from None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    raise ValueError(f"threshold must be 'auto' or a float in [0, 1], got {value!r}.")
  return float(value)


def export_model(
  workdir: str,
  export_dir: str,
  *,
  version: int | None = None,
  threshold: str | float = 'auto',
  keep: float = 0.95,
  num_examples: int | None = None,
  adv_noise_examples: int | None = None,
  demo_request_path: str | None = None,
  demo_examples: int = 5,
) -> tuple[str, dict[str, Any]]:
  """Exports the latest checkpoint of `workdir` to `export_dir/<version>`.

  Args:
    workdir: a training run or an imported one (runs.restore_model reads it; without its data
      only a given threshold works and the noise is uniform noise only).
    export_dir: base directory of the versions.
    version: positive int, or None for one more than the largest existing version.
    threshold: 'auto' (calibrated, see calibration.CALIBRATION_RULE) or a float in [0, 1].
    keep: share of correctly classified test points that 'auto' keeps accepted, in (0, 1].
    num_examples: test points for calibration and accept rates; None: config.eval.max_examples.
    adv_noise_examples: adversarial noise images for the accept rate; None:
      config.eval.adv_noise_examples; 0: skipped.
    demo_request_path: if set, also writes calibration.demo_request(...) JSON there.
    demo_examples: images per kind in the demo request.

  Returns:
    (path of the version directory, the metadata dict written as its asset).
  """
  threshold = parse_threshold(threshold)
  _next_version(export_dir, version)  # Checked before the model is restored.
  model, config, info, step = runs.restore_model(workdir)
  return export_classifier(
    model,
    config,
    info,
    export_dir,
    step=step,
    workdir=workdir,
    final_metrics=runs.read_json(workdir, runs.FINAL_METRICS, required=False),
    version=version,
    threshold=threshold,
    keep=keep,
    num_examples=num_examples,
    adv_noise_examples=adv_noise_examples,
    demo_request_path=demo_request_path,
    demo_examples=demo_examples,
  )


def export_classifier(
  model: keras.Model,
  config: ml_collections.ConfigDict,
  info: input_pipeline.DatasetInfo,
  export_dir: str,
  *,
  step: int,
  workdir: str | None = None,
  final_metrics: dict[str, Any] | None = None,
  test_batches: Iterable[tuple[Any, Any]] | None = None,
  version: int | None = None,
  threshold: str | float = 'auto',
  keep: float = 0.95,
  num_examples: int | None = None,
  adv_noise_examples: int | None = None,
  demo_request_path: str | None = None,
  demo_examples: int = 5,
) -> tuple[str, dict[str, Any]]:
  """Exports a Keras classifier in memory to `export_dir/<version>`: export_model's work.

  Args:
    model: images float32 [B, H, W, C] in [0, 1] -> logits [B, K].
    config: a training config, or one with what is read here: dataset, data_dir, method, model,
      seed, noise and eval.{batch_size, max_examples, adv_noise_steps, adv_noise_eps,
      adv_noise_step_size, adv_noise_examples}; written into the metadata.
    info: input_pipeline.DatasetInfo of the in-distribution set (shape, classes, has_data).
    step: the model's training step (metadata).
    workdir: the run it came from, if any (metadata).
    final_metrics: its final training metrics, if any (metadata).
    test_batches: (images, labels) batches of the in-distribution test set for the calibration
      and the accept rates; None: config.dataset's test split (if info.has_data).
    The other arguments are export_model's.

  Returns:
    (path of the version directory, the metadata dict written as its asset).
  """
  threshold = parse_threshold(threshold)
  version = _next_version(export_dir, version)  # Checked before the minutes of measuring.
  if threshold == 'auto' and not info.has_data:
    raise ValueError(
      f'--threshold=auto calibrates on the {config.dataset} test split, which is '
      'not on this machine: pass a threshold in [0, 1], e.g. --threshold=0.5.'
    )
  num_examples = config.eval.max_examples if num_examples is None else num_examples
  adv_noise_examples = (
    config.eval.adv_noise_examples if adv_noise_examples is None else adv_noise_examples
  )
  sets = calibration.measure_sets(
    model, config, info, num_examples, adv_noise_examples, test_batches=test_batches
  )
  if threshold == 'auto':
    test = sets['test'][1]
    value = ood_metrics.calibrate_threshold(test.confidence, test.predicted == test.labels, keep)
    how = calibration.CALIBRATION_RULE.format(keep=keep, n=len(test.labels), dataset=config.dataset)
  else:
    value, how = threshold, 'given on the command line (--threshold)'
  counts = {name: len(pred.labels) for name, (_, pred) in sets.items()}
  metadata = {
    'format': 'acet_tf abstaining classifier, metadata version 1',
    'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'workdir': os.path.abspath(workdir) if workdir else None,
    'step': step,
    'dataset': config.dataset,
    'method': config.method,
    'model': config.model,
    'class_names': list(info.class_names),
    'num_classes': info.num_classes,
    'input': {
      'shape': list(info.image_shape),
      'float32': 'images in [0, 1] (pixel / 255): serving_default, with_threshold',
      'uint8': 'images in 0..255: serving_uint8',
    },
    'signatures': {
      name: {
        'inputs': {
          k: None if r is None else list(r)
          for k, r in abstaining_classifier.INPUT_RANGES[name].items()
        },
        'outputs': list(abstaining_classifier.OUTPUTS),
      }
      for name in abstaining_classifier.SIGNATURES
    },
    'threshold': {
      'value': value,
      'how': how,
      'mode': 'auto' if threshold == 'auto' else 'fixed',
      'keep': keep if threshold == 'auto' else None,
      'accepted': 'confidence >= threshold, confidence = max softmax probability',
      'accept_rates': calibration.accept_rates(sets, value),
      'not_measured': {}
      if info.has_data
      else {
        'test': f'the {config.dataset} data is not on this machine: no test accept rate, '
        'test error or calibration.',
        'noise': 'uniform noise only (the permuted half needs test images).',
      },
      'examples': counts,
      'adv_noise_attack': (
        {
          'eps': config.eval.adv_noise_eps,
          'step_size': config.eval.adv_noise_step_size,
          'steps': config.eval.adv_noise_steps,
          'objective': 'max log-confidence (eq. 3)',
        }
        if 'adv_noise' in sets
        else None
      ),
      'mmc': {
        name: ood_metrics.mean_max_confidence(pred.confidence) for name, (_, pred) in sets.items()
      },
    },
    'config': json.loads(config.to_json()),
    'final_metrics': final_metrics,
    'versions': {'tensorflow': tf.__version__, 'keras': keras.__version__},
  }

  final_path = os.path.join(export_dir, str(version))
  # Saved beside the final path and renamed when complete, so a server watching export_dir
  # (TensorFlow Serving does) never loads a half-written version.
  tmp_path = os.path.join(export_dir, f'.tmp-{version}-{os.getpid()}')
  module = abstaining_classifier.AbstainingClassifier(
    model, info.image_shape, value, info.class_names
  )
  try:
    with tempfile.TemporaryDirectory() as tmp:
      asset = os.path.join(tmp, METADATA_FILENAME)
      with open(asset, 'w') as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
      module.metadata = tf.saved_model.Asset(asset)
      tf.io.gfile.makedirs(export_dir)
      tf.saved_model.save(module, tmp_path, signatures=module.signatures())
      warmup.write(
        tmp_path, warmup.requests_for(info.image_shape, abstaining_classifier.INPUT_RANGES)
      )
      export_layout.write_manifest(tmp_path)  # Last: marks the version complete.
    if tf.io.gfile.exists(final_path):
      raise FileExistsError(f'{final_path} appeared while exporting; nothing was overwritten.')
    tf.io.gfile.rename(tmp_path, final_path)
  finally:
    if tf.io.gfile.exists(tmp_path):
      tf.io.gfile.rmtree(tmp_path)
  logging.info(
    'Exported step %d of %s to %s; threshold %.6f (%s); accept rates %s',
    step,
    workdir or model.name,
    final_path,
    value,
    metadata['threshold']['mode'],
    json.dumps(metadata['threshold']['accept_rates']),
  )
  if demo_request_path:
    with tf.io.gfile.GFile(demo_request_path, 'w') as f:
      json.dump(calibration.demo_request(sets, demo_examples, info.class_names), f)
    logging.info('Wrote a demo request to %s.', demo_request_path)
  return final_path, metadata
