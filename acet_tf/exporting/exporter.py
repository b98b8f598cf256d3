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

The work is `export_model(...)`, which the binary and tests call.
"""

import datetime
import json
import os
import tempfile

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from acet_tf.artifacts import export_layout
from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import ood_metrics

METADATA_FILENAME = 'metadata.json'
SIGNATURES = ('serving_default', 'serving_uint8', 'with_threshold', 'serving_image_bytes')
OUTPUTS = ('probabilities', 'confidence', 'predicted_class', 'class_name', 'accepted')
# Inclusive value range of each signature input; the server checks requests against these.
INPUT_RANGES = {
  'serving_default': {'images': (0.0, 1.0)},
  'serving_uint8': {'images': (0, 255)},
  'with_threshold': {'images': (0.0, 1.0), 'threshold': (0.0, 1.0)},
  'serving_image_bytes': {'image_bytes': None},  # Encoded files: no numeric range.
}
CALIBRATION_RULE = (
  'auto: the largest threshold t such that at least {keep:.0%} of the correctly classified '
  'in-distribution test points have confidence >= t (ood_metrics.calibrate_threshold, '
  'keep={keep}), computed on the first {n} points of the {dataset} test split. The accept '
  'rates below are measured on those same points, so the test rate is in-sample.'
)


# ----------------------------------------------------------------------------------------------
# The exported module.
# ----------------------------------------------------------------------------------------------


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma.


def decode_images(image_bytes, image_shape):
  """Encoded image files -> float32 [N, H, W, C] in [0, 1], as the model's inputs are made.

  image_bytes: string [N], each a PNG, JPEG, GIF (first frame) or BMP file. Only standard ops
  (DecodeImage, a while loop), so TensorFlow Serving runs it. Each image is converted to C channels
  (alpha dropped; RGB -> gray with ITU-R 601 weights, which sum to 1 so a gray image saved as RGB
  (GIF, some PNGs) gives its gray values back; gray -> RGB by copying),
  then scaled to [0, 1] as pixel / 255 like the training data (input_pipeline), and resized to
  H x W only if its size differs: the datasets are used at their native size, so a file of that
  size gives exactly the training pixels; other sizes are stretched to H x W (aspect ratio not
  kept): an area average when shrinking (exact for integer factors), bilinear when enlarging.
  A file that is not a decodable image fails the whole call with InvalidArgumentError.
  """
  h, w, c = image_shape
  if c not in (1, 3):
    raise ValueError(f'decode_images handles 1 or 3 channels, the model has {c}.')

  def one(data):
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    image = tf.cast(image, tf.float32) / 255.0  # [h, w, 1..4].
    n = tf.shape(image)[-1]
    image = image[..., : tf.where(n % 2 == 0, n - 1, n)]  # Drops alpha: 1 or 3 channels left.
    if c == 1:
      image = tf.cond(
        tf.shape(image)[-1] == 3,
        lambda: tf.reduce_sum(image * _GRAY_WEIGHTS, axis=-1, keepdims=True),
        lambda: image,
      )
    else:
      image = tf.cond(
        tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image
      )
    image = tf.ensure_shape(image, [None, None, c])
    size = tf.shape(image)[:2]
    same = tf.reduce_all(size == tf.constant([h, w]))
    shrink = tf.reduce_all(size >= tf.constant([h, w]))
    image = tf.cond(
      same,
      lambda: image,
      lambda: tf.clip_by_value(
        tf.cond(
          shrink,
          lambda: tf.image.resize(image, [h, w], method='area'),
          lambda: tf.image.resize(image, [h, w], method='bilinear', antialias=True),
        ),
        0.0,
        1.0,
      ),
    )
    return tf.ensure_shape(image, [h, w, c])

  return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))


class AbstainingClassifier(tf.Module):
  """A classifier that reports its confidence and abstains below `threshold`.

  Attributes saved with it: `model` (the Keras model's weights), `threshold` (a float32 variable),
  the tf.functions of SIGNATURES and `set_threshold(t)`.
  """

  def __init__(self, model, image_shape, threshold, class_names):
    super().__init__(name='abstaining_classifier')
    self.model = model
    # A constant in the graph, so TF Serving returns the names with no lookup on the client.
    names = tf.constant([str(n) for n in class_names], tf.string)
    self.threshold = tf.Variable(
      float(threshold), dtype=tf.float32, trainable=False, name='threshold'
    )
    shape = [None] + list(image_shape)
    images_f32 = tf.TensorSpec(shape, tf.float32, name='images')
    images_u8 = tf.TensorSpec(shape, tf.uint8, name='images')
    scalar = tf.TensorSpec([], tf.float32, name='threshold')
    # TF Serving's REST API takes DT_STRING values as {"b64": ...}; the _bytes suffix is the name
    # other TF serving front ends look for.
    encoded = tf.TensorSpec([None], tf.string, name='image_bytes')

    # The checks guard TensorFlow Serving, which has no other input validation; acet_tf.serve
    # validates requests before they get here and names the problem.
    def classify(images, threshold):
      tf.debugging.assert_all_finite(images, 'images must be finite')
      tf.debugging.assert_greater_equal(images, 0.0, 'images must be in [0, 1]')
      tf.debugging.assert_less_equal(images, 1.0, 'images must be in [0, 1]')
      probs = tf.nn.softmax(tf.cast(self.model(images, training=False), tf.float32))
      confidence = tf.reduce_max(probs, axis=1)
      predicted = tf.argmax(probs, axis=1, output_type=tf.int32)
      return {
        'probabilities': probs,
        'confidence': confidence,
        'predicted_class': predicted,
        'class_name': tf.gather(names, predicted),
        'accepted': confidence >= threshold,
      }

    def check_threshold(threshold):
      tf.debugging.assert_all_finite(threshold, 'threshold must be finite')
      tf.debugging.assert_greater_equal(threshold, 0.0, 'threshold must be in [0, 1]')
      tf.debugging.assert_less_equal(threshold, 1.0, 'threshold must be in [0, 1]')

    @tf.function(input_signature=[images_f32])
    def serving_default(images):
      return classify(images, self.threshold)

    @tf.function(input_signature=[images_u8])
    def serving_uint8(images):
      return classify(tf.cast(images, tf.float32) / 255.0, self.threshold)

    @tf.function(input_signature=[images_f32, scalar])
    def with_threshold(images, threshold):
      check_threshold(threshold)
      return classify(images, threshold)

    @tf.function(input_signature=[encoded])
    def serving_image_bytes(image_bytes):
      return classify(decode_images(image_bytes, image_shape), self.threshold)

    @tf.function(input_signature=[scalar])
    def set_threshold(threshold):
      check_threshold(threshold)
      self.threshold.assign(threshold)
      return self.threshold.read_value()

    self.serving_default = serving_default
    self.serving_uint8 = serving_uint8
    self.with_threshold = with_threshold
    self.serving_image_bytes = serving_image_bytes
    self.set_threshold = set_threshold

  def signatures(self):
    return {name: getattr(self, name).get_concrete_function() for name in SIGNATURES}


# ----------------------------------------------------------------------------------------------
# Versions.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Calibration and accept rates.
# ----------------------------------------------------------------------------------------------


def _images(batches):
  """[(images, labels)] -> the images, float32 [N, H, W, C] numpy."""
  return np.concatenate([np.asarray(x) for x, _ in batches])


def measure_sets(model, config, info, num_examples, adv_noise_examples):
  """The test set, noise and adversarial noise, with the model's predictions on them.

  The evaluator's units test, noise and adv_noise (evaluator.evaluate_training_sets, as the
  trainer's periodic evaluation: the same seeds, noise config and eval.adv_noise_* attack) on the
  first `num_examples` test points. Without the data (`info.has_data` False) there is no 'test'
  entry and the noise is uniform noise only (num_examples images, at most the recorded test size;
  the permuted half needs test images).

  Returns:
    {'test', 'noise', 'adv_noise'} -> (images float32 [n, H, W, C] in [0, 1],
    evaluation.Predictions); 'adv_noise' is absent when adv_noise_examples == 0.
  """
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1, got {num_examples}.')
  if adv_noise_examples < 0:
    raise ValueError(f'adv_noise_examples must be >= 0, got {adv_noise_examples}.')
  test = None
  if info.has_data:
    test = input_pipeline.eval_dataset(
      config.dataset,
      'test',
      config.eval.batch_size,
      data_dir=config.data_dir or None,
      max_examples=num_examples,
      options=input_pipeline.options_from_config(config),
    )
  ctx = evaluator.evaluate_training_sets(
    model,
    config,
    info,
    test,
    max_examples=num_examples,
    adv_noise_examples=adv_noise_examples or None,
    sets=('noise', 'adv_noise') if adv_noise_examples else ('noise',),
  )
  return {
    name: (_images(ctx.batches[name]), ctx.predictions[name])
    for name in ('test', 'noise', 'adv_noise')
    if name in ctx.predictions
  }


def accept_rates(sets, threshold):
  """Share of each set with confidence >= threshold, and the test error among accepted points.

  Without a 'test' set (no data) the test rates are absent; the metadata says why.
  """
  rates = {}
  if 'test' in sets:
    rates.update(_test_rates(sets['test'][1], threshold))
  for name in ('noise', 'adv_noise'):
    if name in sets:
      rates[name] = float((sets[name][1].confidence >= threshold).mean())
  return rates


def _test_rates(test, threshold):
  correct = test.predicted == test.labels
  accepted = test.confidence >= threshold
  rates = {
    'test': float(accepted.mean()),
    'test_correct': float(accepted[correct].mean()) if correct.any() else None,
    'test_error_of_accepted': (float(1.0 - correct[accepted].mean()) if accepted.any() else None),
    'test_error': float(1.0 - correct.mean()),
  }
  return rates


def demo_request(sets, per_kind, class_names=None):
  """A REST request for acet_tf.serve with `per_kind` images of each set, plus their descriptions.

  Test images are described by their label's name in `class_names` if given.

  Returns {'signature_name', 'instances': float [n, H, W, C] lists, 'descriptions': [n] str};
  tools/client.py sends all but 'descriptions'. Floats are float32 values written exactly.
  """
  if per_kind < 1:
    raise ValueError(f'demo_examples must be >= 1, got {per_kind}.')
  instances, descriptions = [], []
  for name, (images, pred) in sets.items():
    if len(images) < per_kind:
      raise ValueError(f'demo_examples={per_kind} but only {len(images)} {name} images were made.')
    instances.extend(images[:per_kind].tolist())
    if name == 'test':
      descriptions += [
        f'test image, label {class_names[y] if class_names else y}' for y in pred.labels[:per_kind]
      ]
    else:
      descriptions += [f'{name} image {i}' for i in range(per_kind)]
  return {'signature_name': 'serving_default', 'instances': instances, 'descriptions': descriptions}


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------


def export_model(
  workdir,
  export_dir,
  *,
  version=None,
  threshold='auto',
  keep=0.95,
  num_examples=None,
  adv_noise_examples=None,
  demo_request_path=None,
  demo_examples=5,
):
  """Exports the latest checkpoint of `workdir` to `export_dir/<version>`.

  Args:
    workdir: a training run or an imported one (runs.restore_model reads it; without its data
      only a given threshold works and the noise is uniform noise only).
    export_dir: base directory of the versions.
    version: positive int, or None for one more than the largest existing version.
    threshold: 'auto' (calibrated, see CALIBRATION_RULE) or a float in [0, 1].
    keep: share of correctly classified test points that 'auto' keeps accepted, in (0, 1].
    num_examples: test points for calibration and accept rates; None: config.eval.max_examples.
    adv_noise_examples: adversarial noise images for the accept rate; None:
      config.eval.adv_noise_examples; 0: skipped.
    demo_request_path: if set, also writes demo_request(...) JSON there.
    demo_examples: images per kind in the demo request.

  Returns:
    (path of the version directory, the metadata dict written as its asset).
  """
  threshold = parse_threshold(threshold)
  version = _next_version(export_dir, version)  # Checked before the minutes of measuring.
  model, config, info, step = runs.restore_model(workdir)
  if threshold == 'auto' and not info.has_data:
    raise ValueError(
      f'--threshold=auto calibrates on the {config.dataset} test split, which is '
      'not on this machine: pass a threshold in [0, 1], e.g. --threshold=0.5.'
    )
  num_examples = config.eval.max_examples if num_examples is None else num_examples
  adv_noise_examples = (
    config.eval.adv_noise_examples if adv_noise_examples is None else adv_noise_examples
  )
  sets = measure_sets(model, config, info, num_examples, adv_noise_examples)
  if threshold == 'auto':
    test = sets['test'][1]
    value = ood_metrics.calibrate_threshold(test.confidence, test.predicted == test.labels, keep)
    how = CALIBRATION_RULE.format(keep=keep, n=len(test.labels), dataset=config.dataset)
  else:
    value, how = threshold, 'given on the command line (--threshold)'
  counts = {name: len(pred.labels) for name, (_, pred) in sets.items()}
  metadata = {
    'format': 'acet_tf abstaining classifier, metadata version 1',
    'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'workdir': os.path.abspath(workdir),
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
        'inputs': {k: None if r is None else list(r) for k, r in INPUT_RANGES[name].items()},
        'outputs': list(OUTPUTS),
      }
      for name in SIGNATURES
    },
    'threshold': {
      'value': value,
      'how': how,
      'mode': 'auto' if threshold == 'auto' else 'fixed',
      'keep': keep if threshold == 'auto' else None,
      'accepted': 'confidence >= threshold, confidence = max softmax probability',
      'accept_rates': accept_rates(sets, value),
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
    'final_metrics': runs.read_json(workdir, runs.FINAL_METRICS, required=False),
    'versions': {'tensorflow': tf.__version__, 'keras': keras.__version__},
  }

  final_path = os.path.join(export_dir, str(version))
  # Saved beside the final path and renamed when complete, so a server watching export_dir
  # (TensorFlow Serving does) never loads a half-written version.
  tmp_path = os.path.join(export_dir, f'.tmp-{version}-{os.getpid()}')
  module = AbstainingClassifier(model, info.image_shape, value, info.class_names)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      asset = os.path.join(tmp, METADATA_FILENAME)
      with open(asset, 'w') as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
      module.metadata = tf.saved_model.Asset(asset)
      tf.io.gfile.makedirs(export_dir)
      tf.saved_model.save(module, tmp_path, signatures=module.signatures())
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
    workdir,
    final_path,
    value,
    metadata['threshold']['mode'],
    json.dumps(metadata['threshold']['accept_rates']),
  )
  if demo_request_path:
    with tf.io.gfile.GFile(demo_request_path, 'w') as f:
      json.dump(demo_request(sets, demo_examples, info.class_names), f)
    logging.info('Wrote a demo request to %s.', demo_request_path)
  return final_path, metadata
