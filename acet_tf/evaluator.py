"""Table 1 and Table 2 of the paper (and the evaluations beyond it) for a trained run or an
exported SavedModel, with plots. The binary is acet_tf/evaluate.py; this module reads no flags.

Writes to the output directory (default WORKDIR/eval): results.json (every number and setting),
table.md (laid out like the paper's Table 1, plus Table 2), confidence_histograms.png,
roc_curves.png, image_grid.png and the same scalars and images as TensorBoard summaries.

The work is `evaluate_run` (restores a run or loads an export, loads the datasets) and
`evaluate_model` (any predict function and datasets -> the results dict).
"""

import dataclasses
import json
import os
import platform
import subprocess
import time

from absl import logging
import keras
import matplotlib
import ml_collections
import numpy as np
import scipy
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf import attacks
from acet_tf import evaluation
from acet_tf import input_pipeline
from acet_tf import known_datasets
from acet_tf import metrics
from acet_tf import noise as noise_lib
from acet_tf import out_datasets
from acet_tf import plots
from acet_tf import robust_eval
from acet_tf import runs
from acet_tf import scaling
from acet_tf import scores as scores_lib
from acet_tf import serving_layout
from acet_tf import worst_case

GENERATED_SETS = ('noise', 'adv_noise', 'adv_samples')
ATTACK_ALL_OUT_SETS = 'out_sets'  # In attacked_sets: every out-set that was loaded.
TABLE2 = 'table2'
TABLE2_DEFAULT_EXAMPLES = 10_000  # The paper's number of uniform draws.
DATASETS = 'datasets'  # In --sets: the default out-datasets of the in-distribution set.
SET_TITLES = {
  'noise': 'Noise',
  'adv_noise': 'Adv. Noise',
  'adv_samples': 'Adv. Samples',
  TABLE2: 'Table 2',
}
DATASET_TITLES = {
  'mnist': 'MNIST',
  input_pipeline.MNIST5K: 'MNIST-5k',
  'svhn_cropped': 'SVHN',
  'cifar10': 'CIFAR-10',
  'cifar100': 'CIFAR-100',
}
# The reference counts an adversarial sample as resisted only if the true class is the argmax AND
# has probability above 1.01 / K (a near-uniform prediction is not a correct one).
RESISTED_FACTOR = 1.01

DEFINITIONS = {
  'mmc': 'mean over the points of max_k softmax_k.',
  'auroc': 'exact area under the ROC curve of test set (positive) vs out-set (negative) by '
  'confidence, from ranks with ties counted 1/2.',
  'fpr95': 'reference definition: threshold = 5th percentile of the test-set confidences '
  '(numpy linear interpolation); FPR = share of out-set points with confidence >= '
  'threshold.',
  'aupr_in': 'average precision with the test set as positive (sklearn definition).',
  'aupr_out': 'average precision with the out-set as positive and the confidences negated.',
  'adv_samples': 'PGD on the test set maximising the cross-entropy of the true label. An attack '
  'succeeded unless the true class is still the argmax with probability > '
  '1.01/K (the reference rule). MMC, AUROC, FPR@95 and AUPR use the successful '
  'adversarial samples only, as the reference did; mmc_all is over all of them.',
  'adv_noise': 'PGD from each noise image maximising the max log-confidence (eq. 3); per image '
  'the best point over all iterates and restarts.',
  'noise': 'the training p_out: permuted test images / uniform noise, Gaussian low-pass, '
  'min-max rescale (one per test image).',
  'table2': 'uniform noise x in [0,1]^d; per draw the smallest alpha >= 1 with max softmax '
  'f(alpha x) >= threshold by a geometric grid and bisection (inf if not reached up '
  'to alpha_max); share_overconfident_clipped = share of draws with confidence > '
  'clipped_threshold on clip(alpha x, 0, 1), alpha_max for the unreached draws.',
}


# ------------------------------------------------------------------------------------------------
# Settings.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to evaluate and how. Defaults: the paper's protocol (docs/recipe.md)."""

  sets: tuple[str, ...] = ()  # Empty: every default set. Else names of GENERATED_SETS, TABLE2,
  #                             DATASETS and out_datasets.OUT_SETS.
  max_examples: int | None = None  # Caps every set (None: full test set, 10k for LSUN/ImageNet-).
  batch_size: int = 500
  adv_noise_steps: int = 200
  adv_noise_restarts: int = 1
  adv_noise_eps: float = 0.3
  adv_noise_step_size: float = 0.0075
  adv_samples_steps: int = 80
  adv_samples_eps: float | None = None  # None: 0.3 for 28x28 images, else 0.1.
  adv_samples_step_size: float | None = None  # None: 0.0075 for 28x28 images, else 0.0025.
  table2_examples: int | None = None  # None: 10,000, or max_examples if smaller.
  table2_threshold: float = 0.999
  table2_alpha_max: float = 1e6
  table2_clipped_threshold: float = 0.95
  strict: bool = False  # An out-set that cannot be loaded is an error instead of a skip.
  data_dir: str = ''  # TFDS data_dir of the out-sets ('' = the run's, else the TFDS default).
  imagenet_minus_dir: str = ''
  seed: int | None = None  # None: the run's config.seed (0 without a config).
  num_grid_images: int = 8
  # Beyond the paper (robust_eval); the defaults switch all of it off.
  attacks: tuple = ()  # worst_case.Attack, run on every attacked set.
  attacked_sets: tuple[str, ...] = ()  # 'adv_noise', ATTACK_ALL_OUT_SETS or out-set keys.
  adv_noise_starts: tuple[str, ...] = robust_eval.START_NAMES  # Centres of attacked adv. noise.
  attacked_eps: float | None = None  # Out-sets; None: GOOD's radius (0.3 / 0.03 / 0.01).
  attacked_max_examples: int | None = None  # Points per attacked set; None: max_examples.
  guaranteed: bool = False  # IBP upper bounds on every attacked set (Keras models only).
  image_dirs: tuple[tuple[str, str], ...] = ()  # (key, folder): any folder as an out-set.

  def __post_init__(self):
    def check(ok, message):
      if not ok:
        raise ValueError(f'Bad evaluation setting: {message}')

    check(
      self.max_examples is None or self.max_examples > 0,
      f'max_examples must be > 0, got {self.max_examples}',
    )
    check(self.batch_size > 0, f'batch_size must be > 0, got {self.batch_size}')
    for key in ('adv_noise_steps', 'adv_samples_steps'):
      check(getattr(self, key) >= 0, f'{key} must be >= 0, got {getattr(self, key)}')
    check(
      self.adv_noise_restarts >= 1,
      f'adv_noise_restarts must be >= 1, got {self.adv_noise_restarts}',
    )
    check(
      self.table2_examples is None or self.table2_examples > 0,
      f'table2_examples must be > 0, got {self.table2_examples}',
    )
    check(self.num_grid_images > 0, f'num_grid_images must be > 0, got {self.num_grid_images}')
    for key in ('adv_noise_eps', 'adv_noise_step_size', 'adv_samples_eps', 'adv_samples_step_size'):
      value = getattr(self, key)
      check(value is None or value > 0, f'{key} must be > 0, got {value}')
    folders = {k for k, _ in self.image_dirs}
    known = set(GENERATED_SETS) | {TABLE2, DATASETS} | set(out_datasets.OUT_SETS) | folders
    unknown = [s for s in self.sets if s not in known]
    check(not unknown, f'unknown sets {unknown}; choose from {", ".join(sorted(known))}')
    attackable = {'adv_noise', ATTACK_ALL_OUT_SETS} | set(out_datasets.OUT_SETS) | folders
    unknown = [s for s in self.attacked_sets if s not in attackable]
    check(
      not unknown, f'unknown attacked_sets {unknown}; choose from {", ".join(sorted(attackable))}'
    )
    check(
      not self.attacked_sets or self.attacks or self.guaranteed,
      'attacked_sets need attacks or guaranteed=True',
    )
    bad = [s for s in self.adv_noise_starts if s not in robust_eval.START_NAMES]
    check(
      self.adv_noise_starts and not bad,
      f'adv_noise_starts must be a non-empty subset of {robust_eval.START_NAMES}, got '
      f'{self.adv_noise_starts}',
    )
    check(
      self.attacked_eps is None or self.attacked_eps > 0,
      f'attacked_eps must be > 0, got {self.attacked_eps}',
    )
    check(
      self.attacked_max_examples is None or self.attacked_max_examples > 0,
      f'attacked_max_examples must be > 0, got {self.attacked_max_examples}',
    )
    names = [a.name for a in self.attacks]
    check(len(set(names)) == len(names), f'attack names must be distinct, got {names}')


def _split_list(text):
  return tuple(w.strip() for w in (text or '').split(',') if w.strip())


def parse_image_dirs(entries):
  """('name=folder', ...) -> (('name', 'folder'), ...); refuses entries without both parts."""
  out = []
  for entry in entries:
    key, sep, folder = entry.partition('=')
    if not sep or not key.strip() or not folder.strip():
      raise ValueError(f'image_dirs entries are name=folder, got {entry!r}')
    out.append((key.strip(), folder.strip()))
  return tuple(out)


def settings_from_config(config, **overrides):
  """Settings from an evaluation config (configs/eval.py) plus explicit overrides.

  Args:
    config: ConfigDict (or dict) with the fields of configs/eval.py.
    **overrides: Settings fields that win over the config (the binary's flags that were given).
  """
  c = dict(config)
  attack_list = tuple(
    worst_case.Attack(
      name,
      a['kind'],
      int(a['steps']),
      restarts=int(a['restarts']),
      step_fraction=a.get('step_fraction'),
      random_start=bool(a.get('random_start', True)),
    )
    for name, a in dict(c.get('attacks') or {}).items()
  )
  fields = dict(
    sets=_split_list(c['sets']),
    max_examples=c['max_examples'],
    batch_size=c['batch_size'],
    adv_noise_steps=c['adv_noise_steps'],
    adv_noise_restarts=c['adv_noise_restarts'],
    adv_noise_eps=c['adv_noise_eps'],
    adv_noise_step_size=c['adv_noise_step_size'],
    adv_samples_steps=c['adv_samples_steps'],
    table2_examples=c['table2_examples'],
    image_dirs=parse_image_dirs(_split_list(c.get('image_dirs', ''))),
    attacks=attack_list,
    attacked_sets=_split_list(c.get('attacked_sets', '')),
    adv_noise_starts=_split_list(c.get('adv_noise_starts', 'noise,uniform')),
    attacked_eps=c.get('attacked_eps'),
    attacked_max_examples=c.get('attacked_max_examples'),
    guaranteed=bool(c.get('guaranteed', False)),
  )
  fields.update(overrides)
  return Settings(**fields)


def adv_samples_budget(settings, image_shape):
  """(eps, step_size) of the adversarial-sample attack: 0.3/0.0075 for 28x28, else 0.1/0.0025."""
  small = tuple(image_shape[:2]) == (28, 28)
  eps = settings.adv_samples_eps or (0.3 if small else 0.1)
  step = settings.adv_samples_step_size or (0.0075 if small else 0.0025)
  return eps, step


def table2_examples(settings):
  """Uniform draws for Table 2: as set, else the paper's 10,000 capped by max_examples."""
  if settings.table2_examples is not None:
    return settings.table2_examples
  return min(TABLE2_DEFAULT_EXAMPLES, settings.max_examples or TABLE2_DEFAULT_EXAMPLES)


def resolve_sets(settings, dataset):
  """Which sets to evaluate.

  Returns:
    (out-set keys, generated set names, whether to run Table 2, {key: reason} of default sets left
    out on purpose (ImageNet- without --imagenet_minus_dir)).
  """
  requested = settings.sets or (DATASETS,) + GENERATED_SETS + (TABLE2,)
  keys, left_out = [], {}
  for name in requested:
    if name == DATASETS:
      if not out_datasets.default_out_sets(dataset):
        left_out[DATASETS] = (
          f'{dataset} is your own data, which has no default out-distribution datasets: name '
          f'them with --sets (one of {", ".join(out_datasets.OUT_SETS)}), e.g. '
          '--sets=imagenet_minus --imagenet_minus_dir=<a folder of images unlike yours>.'
        )
      for key in out_datasets.default_out_sets(dataset):
        if key == 'imagenet_minus' and not settings.imagenet_minus_dir:
          left_out[key] = 'not public: pass --imagenet_minus_dir=<folder of images> to include it.'
        elif key not in keys:
          keys.append(key)
    elif (name in out_datasets.OUT_SETS or name in dict(settings.image_dirs)) and name not in keys:
      keys.append(name)
  generated = tuple(s for s in GENERATED_SETS if s in requested)
  return tuple(keys), generated, TABLE2 in requested, left_out


# ------------------------------------------------------------------------------------------------
# Models: a Keras model or a SavedModel, both as predict functions.
# ------------------------------------------------------------------------------------------------


def keras_model_fns(model):
  """(predict_fn: images -> probabilities, logits_fn: images -> logits) of a Keras model."""
  return evaluation.make_predict_fn(model), lambda images: model(images, training=False)


def log_probabilities(predict_fn):
  """logits_fn from a predict function: softmax(log p) = p, so attacks can use it as logits.

  Probabilities that underflow to 0 are floored at the smallest normal float32 so that the
  gradient stays finite.
  """
  tiny = float(np.finfo(np.float32).tiny)
  return lambda images: tf.math.log(tf.maximum(tf.cast(predict_fn(images), tf.float32), tiny))


class SavedModelClassifier:
  """A SavedModel's `serving_default` (input `images` float32 [None, H, W, C] in [0, 1], output
  `probabilities` [None, K], optionally `logits`) as predict/logits functions.

  `path` is a version directory (holding saved_model.pb) or an export directory of integer versions
  (the newest is used). `metadata` is assets/metadata.json when the export has one, else {}.
  """

  def __init__(self, path):
    if not tf.io.gfile.exists(os.path.join(path, 'saved_model.pb')):
      versions = serving_layout.list_versions(path)
      if not versions:
        raise FileNotFoundError(
          f'No saved_model.pb in {path} nor in an integer version directory below it.'
        )
      path = os.path.join(path, str(versions[-1]))
    self.path = path
    self._loaded = tf.saved_model.load(path)  # Kept: the signature needs its variables alive.
    if 'serving_default' not in self._loaded.signatures:
      raise ValueError(
        f'{path} has no serving_default signature (it has {list(self._loaded.signatures)}).'
      )
    self._signature = self._loaded.signatures['serving_default']
    inputs = self._signature.structured_input_signature[1]
    if 'images' not in inputs:
      raise ValueError(f'serving_default of {path} takes {list(inputs)}, not images.')
    spec = inputs['images']
    if spec.dtype != tf.float32 or spec.shape.rank != 4 or not spec.shape[1:].is_fully_defined():
      raise ValueError(
        f'serving_default of {path} must take images float32 [None, H, W, C], got {spec}.'
      )
    self.image_shape = tuple(spec.shape[1:])
    outputs = self._signature.structured_outputs
    if 'probabilities' not in outputs:
      raise ValueError(f'serving_default of {path} returns {list(outputs)}, not probabilities.')
    self.has_logits = 'logits' in outputs
    metadata_path = os.path.join(path, 'assets', 'metadata.json')
    self.metadata = {}
    if tf.io.gfile.exists(metadata_path):
      with tf.io.gfile.GFile(metadata_path) as f:
        self.metadata = json.load(f)

  def probabilities(self, images):
    return self._signature(images=tf.convert_to_tensor(images, tf.float32))['probabilities']

  def logits(self, images):
    return self._signature(images=tf.convert_to_tensor(images, tf.float32))['logits']

  def fns(self):
    """(predict_fn, logits_fn): the export's logits if it has them, else log-probabilities."""
    return self.probabilities, (
      self.logits if self.has_logits else log_probabilities(self.probabilities)
    )


# ------------------------------------------------------------------------------------------------
# The evaluation.
# ------------------------------------------------------------------------------------------------


def adversarial_sample_metrics(in_confidences, confidence, predicted, labels, num_classes):
  """Table 1's adversarial-sample row, the reference's way.

  Args:
    in_confidences: float [N] test-set confidences (the positives).
    confidence: float [M] max softmax on the adversarial samples.
    predicted: int [M] argmax on them; labels: int [M] their true labels.
    num_classes: K.

  Returns:
    (entry, success bool [M]): entry has success_rate, num_attacked, num_successful, mmc_all and
    metrics.ood_metrics of the successful samples only (None each if there is none).
  """
  confidence = np.asarray(confidence)
  resisted = (np.asarray(predicted) == np.asarray(labels)) & (
    confidence > RESISTED_FACTOR / num_classes
  )
  success = ~resisted
  entry = {
    'num_attacked': int(success.size),
    'num_successful': int(success.sum()),
    'success_rate': float(success.mean()),
    'mmc_all': metrics.mean_max_confidence(confidence),
  }
  if success.any():
    entry.update(metrics.ood_metrics(in_confidences, confidence[success]))
  else:
    entry.update(dict.fromkeys(('mmc', 'auroc', 'aupr_in', 'aupr_out', 'fpr95')))
  return entry, success


def _zero_labels(batches):
  for images in batches:
    if isinstance(images, (tuple, list)):
      images = images[0]
    yield images, tf.zeros(tf.shape(images)[:1], tf.int32)


def _concat_images(batches, n):
  """First n images of batches of (images, labels) as numpy float32."""
  return np.concatenate([np.asarray(b[0]) for b in evaluation.take_examples(batches, n)])[:n]


def evaluate_model(
  predict_fn,
  info,
  test_batches,
  settings,
  *,
  out_sets=None,
  skipped=None,
  logits_fn=None,
  noise_config=None,
  output_dir=None,
  step=0,
  description=None,
  keras_model=None,
  true_logits=False,
):
  """Table 1 and Table 2 for one model; the binary only calls this (via evaluate_run) and prints.

  Args:
    predict_fn: images float32 [B, H, W, C] in [0, 1] -> probabilities float32 [B, K].
    info: input_pipeline.DatasetInfo of the in-distribution set.
    test_batches: iterable of (images float32 [b, H, W, C] in [0, 1], labels int [b]) of the
      in-distribution test set (capped at settings.max_examples); None when the data is not on
      this machine: then there is no test row, no AUROC/FPR/AUPR, no adversarial samples, and the
      noise sets are uniform noise only (the permuted half needs images), all said in
      results['data_free'] and the table.
    settings: Settings. Its `sets` picks the generated sets and Table 2 (the out-datasets are the
      ones given in `out_sets`); settings.seed must be set.
    out_sets: {out-set key: iterable of image batches float32 [b, H, W, C] (or (images, labels))}.
    skipped: {key: reason} of sets that cannot be evaluated (out-sets that could not be loaded;
      also generated sets or 'table2', which are then not run), recorded in the results.
    logits_fn: images -> logits for the attacks; default log(predict_fn) (same softmax).
    noise_config: the p_out settings (config.noise); default the paper's.
    output_dir: if given, writes results.json, table.md, PNGs and TensorBoard summaries there.
    step: the model's training step (summaries, results).
    description: dict of facts about the model (source, method, ...) copied into the results.
    keras_model: the Keras model behind logits_fn, for the IBP bounds (settings.guaranteed).
    true_logits: logits_fn gives the model's logits (not log-probabilities): then every clean set
      is scored once for max softmax, max logit and energy (results 'scores').

  Returns:
    The results dict (what results.json holds): 'test', 'out_sets' {key: metrics}, 'table2',
    'skipped', 'settings', 'definitions', 'versions', 'model', 'timing'.
  """
  if settings.seed is None:
    raise ValueError('settings.seed must be set (evaluate_run takes it from the run config).')
  start = time.time()
  # The p_out block is the same for every method of base_config (only its ratio differs).
  noise_config = noise_config or noise_lib.paper_noise_config()
  logits_fn = logits_fn or log_probabilities(predict_fn)

  def attack_model(images, training=False):  # The model interface of attack_batches.
    del training  # logits_fn is always inference mode.
    return logits_fn(images)

  skipped = dict(skipped or {})
  requested = [s for s in settings.sets or GENERATED_SETS + (TABLE2,) if s not in skipped]
  generated = tuple(s for s in GENERATED_SETS if s in requested)
  run_table2 = TABLE2 in requested
  cap = settings.max_examples if settings.max_examples is not None else np.iinfo(np.int64).max

  results = {
    'model': dict(
      description or {},
      step=int(step),
      dataset=info.name,
      image_shape=list(info.image_shape),
      num_classes=info.num_classes,
      class_names=list(info.class_names),
    ),
    'settings': dataclasses.asdict(settings),
    'definitions': DEFINITIONS,
    'seeds': {
      'base': settings.seed,
      'streams': {
        'noise': evaluation.NOISE_STREAM,
        'adv_noise': evaluation.ADV_NOISE_STREAM,
        'adv_samples': evaluation.ADV_SAMPLES_STREAM,
        'table2': scaling.TABLE2_STREAM,
      },
      'rule': 'batch_random.step_seed(base, step=-1, stream), folded in per batch',
    },
    'noise_config': json.loads(noise_config.to_json())
    if hasattr(noise_config, 'to_json')
    else dict(noise_config),
    'versions': versions(),
    'out_sets': {},
    'skipped': skipped,
    'timing': {},
  }
  titles = {'test': f'{DATASET_TITLES.get(info.name, info.name)} (test)'}
  confidences, grid = {}, {}
  scores_fn = scores_lib.make_scores_fn(logits_fn) if true_logits else None
  set_scores = {}  # {set key: {score: [N]}}, from the same forward pass as the confidences.

  def predict(key, batches):
    if scores_fn is None:
      return evaluation.predict_batches(predict_fn, batches)
    s, predicted, labels = scores_lib.score_batches(scores_fn, batches)
    set_scores[key] = s
    return evaluation.Predictions(s['max_softmax'], predicted, labels)

  # Test set: the positives of every detection metric.
  t = time.time()
  n_grid = settings.num_grid_images
  if test_batches is None:
    test, in_conf, results['test'] = _data_free(
      results, skipped, generated, info, cap, settings.batch_size
    )
    noise_config = ml_collections.ConfigDict(dict(noise_config), type_safe=False)
    noise_config.permuted_fraction = 0.0  # Nothing to permute: uniform start only.
    results['noise_config'] = json.loads(noise_config.to_json())
    generated = tuple(s for s in generated if s != 'adv_samples')
  else:
    test = [
      (tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32))
      for x, y in evaluation.take_examples(test_batches, cap)
    ]
    test_pred = predict('test', test)
    in_conf = test_pred.confidence
    results['test'] = {
      'error': metrics.error_rate(test_pred.predicted, test_pred.labels),
      'mmc': metrics.mean_max_confidence(in_conf),
      'num_examples': int(in_conf.size),
      'per_class': per_class_metrics(test_pred, info.class_names),
    }
    results['timing']['test'] = time.time() - t
    confidences['test'] = in_conf
    grid['test'] = (
      _concat_images(test, n_grid),
      test_pred.predicted[:n_grid],
      in_conf[:n_grid],
      test_pred.labels[:n_grid],
    )
    logging.info(
      'test: %d images, error %.2f%%, MMC %.3f, %.1f s',
      in_conf.size,
      100 * results['test']['error'],
      results['test']['mmc'],
      time.time() - t,
    )

  def add(key, conf, title, extra=None, seconds=0.0):
    if in_conf is None:  # No test-set confidences: MMC only, the rest absent (not invented).
      entry = {
        'mmc': metrics.mean_max_confidence(conf),
        'auroc': None,
        'aupr_in': None,
        'aupr_out': None,
        'fpr95': None,
      }
    else:
      entry = metrics.ood_metrics(in_conf, conf)
    entry['num_examples'] = int(np.size(conf))
    entry.update(extra or {})
    entry.update(title=title, seconds=seconds)
    results['out_sets'][key] = entry
    confidences[key] = conf
    titles[key] = title
    logging.info(
      '%s: %d images, MMC %.3f, AUROC %s, FPR@95 %s, %.1f s',
      key,
      np.size(conf),
      entry['mmc'],
      _fmt(entry['auroc']),
      _fmt(entry['fpr95']),
      seconds,
    )

  for key, batches in (out_sets or {}).items():
    t = time.time()
    pred = predict(key, evaluation.take_examples(_zero_labels(batches), cap))
    add(key, pred.confidence, _title(key), seconds=time.time() - t)

  noise = None
  if 'noise' in generated or 'adv_noise' in generated:
    noise = list(
      evaluation.noise_batches(
        test, evaluation.eval_seed(settings.seed, evaluation.NOISE_STREAM), noise_config
      )
    )
  if 'noise' in generated:
    t = time.time()
    pred = predict('noise', noise)
    add('noise', pred.confidence, _noise_title('noise', results), seconds=time.time() - t)
    grid['noise'] = (
      _concat_images(noise, n_grid),
      pred.predicted[:n_grid],
      pred.confidence[:n_grid],
    )

  if 'adv_noise' in generated:
    t = time.time()
    adv = list(
      evaluation.attack_batches(
        attack_model,
        noise,
        attacks.max_log_confidence_objective,
        eps=settings.adv_noise_eps,
        step_size=settings.adv_noise_step_size,
        steps=settings.adv_noise_steps,
        seed=evaluation.eval_seed(settings.seed, evaluation.ADV_NOISE_STREAM),
        restarts=settings.adv_noise_restarts,
        name='adv_noise',
      )
    )
    pred = evaluation.predict_batches(predict_fn, adv)
    add(
      'adv_noise',
      pred.confidence,
      _noise_title('adv_noise', results),
      seconds=time.time() - t,
      extra={
        'eps': settings.adv_noise_eps,
        'step_size': settings.adv_noise_step_size,
        'steps': settings.adv_noise_steps,
        'restarts': settings.adv_noise_restarts,
      },
    )
    grid['adv_noise'] = (
      _concat_images(adv, n_grid),
      pred.predicted[:n_grid],
      pred.confidence[:n_grid],
    )

  if 'adv_samples' in generated:
    t = time.time()
    eps, step_size = adv_samples_budget(settings, info.image_shape)
    adv = list(
      evaluation.attack_batches(
        attack_model,
        test,
        attacks.cross_entropy_objective,
        eps=eps,
        step_size=step_size,
        steps=settings.adv_samples_steps,
        seed=evaluation.eval_seed(settings.seed, evaluation.ADV_SAMPLES_STREAM),
        name='adv_samples',
      )
    )
    pred = evaluation.predict_batches(predict_fn, adv)
    entry, success = adversarial_sample_metrics(
      in_conf, pred.confidence, pred.predicted, pred.labels, info.num_classes
    )
    entry.update(
      eps=eps,
      step_size=step_size,
      steps=settings.adv_samples_steps,
      title=SET_TITLES['adv_samples'],
      seconds=time.time() - t,
    )
    entry['num_examples'] = entry['num_successful']
    results['out_sets']['adv_samples'] = entry
    titles['adv_samples'] = 'Adv. Samples (successful)'
    if success.any():
      confidences['adv_samples'] = pred.confidence[success]
    logging.info(
      'adv_samples: %d attacked, success rate %.1f%%, MMC (successful) %s, %.1f s',
      entry['num_attacked'],
      100 * entry['success_rate'],
      _fmt(entry['mmc']),
      entry['seconds'],
    )
    # Successful ones first: they are the ones the row is about.
    order = np.argsort(~success, kind='stable')[:n_grid]
    images = np.concatenate([np.asarray(b[0]) for b in adv])
    grid['adv_samples'] = (
      images[order],
      pred.predicted[order],
      pred.confidence[order],
      pred.labels[order],
    )

  if settings.attacked_sets:
    _attacked_sets(
      results,
      settings,
      info,
      logits_fn,
      predict_fn,
      in_conf,
      confidences,
      test,
      noise,
      out_sets,
      cap,
      keras_model,
      noise_config,
    )
  if 'test' in set_scores:  # Data-free runs have no test scores to compare with.
    results['scores'] = {
      key: {
        name: scores_lib.detection_metrics(set_scores['test'][name], values[name])
        for name in scores_lib.SCORES
      }
      for key, values in set_scores.items()
      if key != 'test'
    }
    results['definitions'] = dict(DEFINITIONS, scores=scores_lib.__doc__)

  if run_table2:
    t = time.time()
    summary, _, _ = scaling.table2(
      predict_fn,
      info.image_shape,
      seed=evaluation.eval_seed(settings.seed, scaling.TABLE2_STREAM),
      num_examples=table2_examples(settings),
      batch_size=settings.batch_size,
      threshold=settings.table2_threshold,
      alpha_max=settings.table2_alpha_max,
      clipped_threshold=settings.table2_clipped_threshold,
    )
    summary['seconds'] = time.time() - t
    results['table2'] = summary
    logging.info(
      'table2: %d draws, median alpha %s, unreached %.1f%%, overconfident after '
      'clipping %.1f%%, %.1f s',
      summary['num_examples'],
      _fmt_alpha(summary['median'], summary['alpha_max']),
      100 * summary['share_unreached'],
      100 * summary['share_overconfident_clipped'],
      summary['seconds'],
    )
  results['timing']['total'] = time.time() - start

  if output_dir:
    write_outputs(
      results,
      output_dir,
      confidences=confidences,
      titles=titles,
      grid=grid,
      class_names=info.class_names,
      step=step,
    )
  return results


UNIFORM_ONLY = 'uniform start only'


def _data_free(results, skipped, generated, info, cap, batch_size):
  """The evaluation's stand-ins when the in-distribution data is absent.

  Records what is not run in results['data_free'] (and adv_samples in `skipped`). Returns
  (source batches of zero images for the noise generator: as many as max_examples, else the test
  set's recorded size; None for the test confidences; None for results['test']).
  """
  reason = (
    f'the {info.name} data is not on this machine (recorded shape and classes used, see '
    'known_datasets)'
  )
  notes = {
    'test': f'not run: {reason}.',
    'auroc': 'AUROC, FPR@95 and AUPR need the test-set confidences: absent, not computed.',
  }
  if 'noise' in generated or 'adv_noise' in generated:
    notes['noise'] = (
      f"{UNIFORM_ONLY}: the permuted half of the paper's noise permutes "
      f'{info.name} images; every noise image here is blurred uniform noise.'
    )
  if 'adv_samples' in generated:
    skipped['adv_samples'] = f'needs the test set: {reason}.'
  results['data_free'] = notes
  logging.warning('No in-distribution data: %s', ' '.join(notes.values()))
  n = int(min(cap, info.num_test_examples))
  zeros = [
    (
      tf.zeros([min(batch_size, n - i), *info.image_shape], tf.float32),
      tf.zeros([min(batch_size, n - i)], tf.int32),
    )
    for i in range(0, n, batch_size)
  ]
  return zeros, None, None


def _attacked_sets(
  results,
  settings,
  info,
  logits_fn,
  predict_fn,
  in_conf,
  confidences,
  test,
  noise,
  out_sets,
  cap,
  keras_model,
  noise_config,
):
  """results['attacked'] (worst case, per attack, guaranteed) for settings.attacked_sets."""
  t = time.time()
  n = settings.attacked_max_examples or cap
  keys = []
  for name in settings.attacked_sets:
    keys += list(out_sets or {}) if name == ATTACK_ALL_OUT_SETS else [name]
  sets, eps_of, extra, skipped = {}, {}, {}, results['skipped']
  out_eps = settings.attacked_eps or robust_eval.default_attack_eps(info.name, info.image_shape)
  for key in dict.fromkeys(keys):
    if key == 'adv_noise':
      source = list(evaluation.take_examples(test, n))
      starts = {}
      if 'noise' in settings.adv_noise_starts:
        starts['noise'] = (
          list(evaluation.take_examples(noise, n))
          if noise is not None
          else list(
            evaluation.noise_batches(
              source, evaluation.eval_seed(settings.seed, evaluation.NOISE_STREAM), noise_config
            )
          )
        )
      if 'uniform' in settings.adv_noise_starts:
        starts['uniform'] = list(
          robust_eval.uniform_batches(
            source, evaluation.eval_seed(settings.seed, robust_eval.UNIFORM_STREAM)
          )
        )
      sets[key], eps_of[key] = starts, settings.adv_noise_eps
      if 'adv_noise' in confidences and 'noise' in starts:
        # The paper's attack on the same noise images: by construction under the worst case.
        extra[key] = {'paper@noise': confidences['adv_noise'][:n]}
    elif key in (out_sets or {}):
      sets[key] = {'image': list(evaluation.take_examples(_zero_labels(out_sets[key]), n))}
      eps_of[key] = out_eps
    elif key not in skipped:
      skipped[f'attacked/{key}'] = 'not loaded: add it to --sets (or it could not be loaded).'
  bound_model = keras_model
  if settings.guaranteed and keras_model is None:
    skipped['guaranteed'] = (
      'IBP needs the Keras model (evaluate the checkpoint with --workdir, not a SavedModel).'
    )
  results['attacked'] = robust_eval.evaluate_attacked_sets(
    sets,
    logits_fn=logits_fn,
    predict_fn=predict_fn,
    in_conf=in_conf,
    attack_list=settings.attacks,
    eps_of=eps_of,
    seed=settings.seed,
    bound_model=bound_model,
    guaranteed_metrics=settings.guaranteed,
    extra=extra,
    log=logging.info,
  )
  results['timing']['attacked'] = time.time() - t


# ------------------------------------------------------------------------------------------------
# Outputs.
# ------------------------------------------------------------------------------------------------


def per_class_metrics(pred, class_names):
  """{class name: {'num_examples', 'error', 'mmc', 'predicted'}} on the test set, in class order.

  'error' is over the test images of that class; 'predicted' counts the test images predicted as
  that class; 'mmc' is the mean confidence on the images of the class (None without images).
  """
  labels, predicted = np.asarray(pred.labels), np.asarray(pred.predicted)
  confidence = np.asarray(pred.confidence)
  table = {}
  for k, name in enumerate(class_names):
    mine = labels == k
    n = int(mine.sum())
    table[str(name)] = {
      'num_examples': n,
      'error': float((predicted[mine] != k).mean()) if n else None,
      'mmc': float(confidence[mine].mean()) if n else None,
      'predicted': int((predicted == k).sum()),
    }
  return table


def versions():
  """Library versions and the git commit of the code, for results.json."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {
    'python': platform.python_version(),
    'tensorflow': tf.__version__,
    'keras': keras.__version__,
    'numpy': np.__version__,
    'scipy': scipy.__version__,
    'tensorflow_datasets': tfds.__version__,
    'matplotlib': matplotlib.__version__,
    'git_commit': commit,
  }


def _json_safe(value):
  """Non-finite floats as the strings 'inf', '-inf', 'nan' (strict JSON has no such numbers)."""
  if isinstance(value, dict):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if np.isfinite(value) else str(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def _noise_title(key, results):
  if 'noise' in results.get('data_free', {}):
    return f'{SET_TITLES[key]} ({UNIFORM_ONLY})'
  return SET_TITLES[key]


def _title(key):
  if key in out_datasets.OUT_SETS:
    return out_datasets.OUT_SETS[key].title
  return SET_TITLES.get(key, key)


def _fmt(value, digits=3):
  return '–' if value is None else f'{value:.{digits}f}'


def _fmt_alpha(value, alpha_max):
  return f'> {alpha_max:g}' if not np.isfinite(value) else f'{value:.4g}'


def format_table(results):
  """table.md: Table 1 as in the paper (MMC / AUROC / FPR@95 per out-set, plus AUPR) and Table 2."""
  model, test = results['model'], results['test']
  name = DATASET_TITLES.get(model['dataset'], model['dataset'])
  method = (model.get('method') or 'model').upper() if model.get('method') != 'plain' else 'Plain'
  if test is None:  # Data-free: no test row (results['data_free'] says why).
    test = {'error': None, 'mmc': None, 'num_examples': 0}
  te = '–' if test['error'] is None else f'{100 * test["error"]:.2f}%'
  lines = [
    f'# Evaluation: {method} {model.get("model", "")} on {name}'.rstrip(),
    '',
    f'Source: {model.get("source", "?")} `{model.get("path", "")}`, training step {model["step"]}.',
    '',
    '## Table 1',
    '',
    f'| Trained on {name} — {method} (TE: {te}) | N | MMC | AUROC | FPR@95 | AUPR-in | AUPR-out |',
    '|---|---:|---:|---:|---:|---:|---:|',
    f'| {name} (test) | {test["num_examples"] or "not run"} | {_fmt(test["mmc"])} | – | – '
    '| – | – |',
  ]
  for key, e in results['out_sets'].items():
    title = e.get('title', key)
    n = str(e['num_examples'])
    if key == 'adv_samples':
      title += ' ¹'
      n = f'{e["num_successful"]} of {e["num_attacked"]}'
    lines.append(
      f'| {title} | {n} | {_fmt(e["mmc"])} | {_fmt(e["auroc"])} | {_fmt(e["fpr95"])} '
      f'| {_fmt(e["aupr_in"])} | {_fmt(e["aupr_out"])} |'
    )
  lines.append('')
  if test['num_examples']:
    lines.append(
      f'Test error {te}, test MMC {test["mmc"]:.3f} over {test["num_examples"]} test images.'
    )
  if results.get('data_free'):
    lines.append('Not run without the in-distribution data:')
    lines += [f'- {key}: {note}' for key, note in results['data_free'].items()]
  if test.get('per_class'):
    lines += [
      '',
      '## Test set per class',
      '',
      '| class | N | error | MMC | predicted as |',
      '|---|---:|---:|---:|---:|',
    ]
    for name, e in test['per_class'].items():
      error = '–' if e['error'] is None else f'{100 * e["error"]:.2f}%'
      lines.append(
        f'| {name} | {e["num_examples"]} | {error} | {_fmt(e["mmc"])} | {e["predicted"]} |'
      )
  if results['skipped']:
    lines.append('')
    lines.append('Skipped (not evaluated):')
    for key, reason in results['skipped'].items():
      lines.append(f'- {_title(key)}: {reason}')
  lines.append('')
  notes = []
  if 'adv_samples' in results['out_sets']:
    e = results['out_sets']['adv_samples']
    notes.append(
      f'¹ Adversarial samples: PGD {e["steps"]} steps of {e["step_size"]:g} in the L-inf ball '
      f"eps {e['eps']:g} on {e['num_attacked']} test images, maximising the true label's "
      f'cross-entropy; success rate {100 * e["success_rate"]:.1f}%. MMC, AUROC, FPR@95 and AUPR '
      f'are over the {e["num_successful"]} successful adversarial samples only, as the '
      f'reference did (an attack fails only if the true class stays the argmax with probability '
      f'> 1.01/K). MMC over all of them: {e["mmc_all"]:.3f}.'
    )
  if 'adv_noise' in results['out_sets']:
    e = results['out_sets']['adv_noise']
    notes.append(
      f'Adv. noise: PGD {e["steps"]} steps of {e["step_size"]:g}, eps {e["eps"]:g}, '
      f'{e["restarts"]} restart(s), maximising the max log-confidence from each noise image.'
    )
  notes.append('FPR@95: ' + DEFINITIONS['fpr95'] + ' AUROC: ' + DEFINITIONS['auroc'])
  lines.append('\n\n'.join(notes))
  lines += _robust_table(results)
  if 'table2' in results:
    t2 = results['table2']
    lines += [
      '',
      '## Table 2',
      '',
      f'Uniform noise x in [0,1]^d scaled by alpha >= 1; {t2["num_examples"]} draws.',
      '',
      f'| median alpha (conf >= {t2["threshold"]:g}) | q25 | q75 | never reached up to '
      f'{t2["alpha_max"]:g} | % overconfident after clipping (> {t2["clipped_threshold"]:g}) |',
      '|---:|---:|---:|---:|---:|',
      f'| {_fmt_alpha(t2["median"], t2["alpha_max"])} | {_fmt_alpha(t2["q25"], t2["alpha_max"])} '
      f'| {_fmt_alpha(t2["q75"], t2["alpha_max"])} | {100 * t2["share_unreached"]:.1f}% | '
      f'{100 * t2["share_overconfident_clipped"]:.1f}% |',
      '',
      'Search: ' + DEFINITIONS['table2'],
    ]
  return '\n'.join(lines) + '\n'


def _robust_table(results):
  """table.md lines of the attacked sets (worst case, per attack, guaranteed) and the scores."""
  lines = []
  if results.get('attacked'):
    lines += [
      '',
      '## Worst case over attacks and starts; certified (IBP) bounds',
      '',
      '| Attacked set | eps | N | worst-case MMC | AUROC | FPR@95 | guaranteed MMC | guaranteed '
      'AUROC | guaranteed FPR@95 |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for key, e in results['attacked'].items():
      w = e.get('worst_case', {})
      n = w.get('num_examples', e.get('guaranteed_num_examples', 0))
      lines.append(
        f'| {_title(key)} | {e["eps"]:g} | {n} | {_fmt(w.get("mmc"))} | {_fmt(w.get("auroc"))} '
        f'| {_fmt(w.get("fpr95"))} | {_fmt(e.get("guaranteed_mmc"))} | '
        f'{_fmt(e.get("guaranteed_auroc"))} | {_fmt(e.get("guaranteed_fpr95"))} |'
      )
    lines += [
      '',
      'Per attack (`attack@start`; MMC / AUROC; the worst case is the per-point '
      'maximum '
      'over all of them):',
      '',
    ]
    for key, e in results['attacked'].items():
      parts = [
        f'{k} {_fmt(a["mmc"])} / {_fmt(a["auroc"])}' for k, a in e.get('attacks', {}).items()
      ]
      if parts:
        lines.append(f'- {_title(key)}: ' + '; '.join(parts))
    lines += [
      '',
      'AUROC and FPR@95 (in-distribution positive) of the clean test confidences '
      'against the worst-case confidences, resp. against the IBP upper bounds.',
    ]
  if results.get('scores'):
    lines += [
      '',
      '## Scores side by side',
      '',
      'AUROC / FPR@95 with the in-distribution positive (the paper) / FPR@95 with the '
      'out-distribution positive (OpenOOD v1.5), on the same forward passes.',
      '',
      '| Out-set | ' + ' | '.join(scores_lib.SCORES) + ' |',
      '|---|' + '---:|' * len(scores_lib.SCORES),
    ]
    for key, per_score in results['scores'].items():
      cells = [
        f'{_fmt(m["auroc"])} / {_fmt(m["fpr95_in_positive"])} / {_fmt(m["fpr95_out_positive"])}'
        for m in per_score.values()
      ]
      lines.append(f'| {_title(key)} | ' + ' | '.join(cells) + ' |')
  return lines


def summary_scalars(results):
  """{TensorBoard tag: value} of every scalar in the results."""
  scalars = {}
  if results['test'] is not None:
    scalars = {'eval/test/error': results['test']['error'], 'eval/test/mmc': results['test']['mmc']}
  for key, e in results['out_sets'].items():
    for m in ('mmc', 'auroc', 'fpr95', 'aupr_in', 'aupr_out', 'success_rate', 'mmc_all'):
      if e.get(m) is not None:
        scalars[f'eval/{key}/{m}'] = e[m]
  for key, e in results.get('attacked', {}).items():
    for m in ('mmc', 'auroc', 'fpr95'):
      if e.get('worst_case', {}).get(m) is not None:  # None: data-free, no AUROC.
        scalars[f'eval/attacked/{key}/worst_case/{m}'] = e['worst_case'][m]
      if e.get(f'guaranteed_{m}') is not None:
        scalars[f'eval/attacked/{key}/guaranteed_{m}'] = e[f'guaranteed_{m}']
  if 'table2' in results:
    t2 = results['table2']
    scalars.update(
      {
        'table2/median_alpha': t2['median'],
        'table2/q25_alpha': t2['q25'],
        'table2/q75_alpha': t2['q75'],
        'table2/share_unreached': t2['share_unreached'],
        'table2/share_overconfident_clipped': t2['share_overconfident_clipped'],
      }
    )
  return scalars


def write_outputs(results, output_dir, *, confidences, titles, grid, class_names, step):
  """results.json, table.md, the PNGs and TensorBoard summaries in `output_dir`."""
  tf.io.gfile.makedirs(output_dir)
  name = DATASET_TITLES.get(results['model']['dataset'], results['model']['dataset'])
  label = f'{results["model"].get("method", "")} {name}'.strip()
  pngs = {}
  if confidences:  # None for Table 2 alone without the test set.
    pngs['confidence_histograms'] = os.path.join(output_dir, 'confidence_histograms.png')
    plots.confidence_histograms(
      {titles[k]: v for k, v in confidences.items()},
      pngs['confidence_histograms'],
      title=f'Confidences: {label}',
      num_classes=len(class_names),
    )
  out = {titles[k]: v for k, v in confidences.items() if k != 'test'}
  if out and 'test' in confidences:
    pngs['roc_curves'] = os.path.join(output_dir, 'roc_curves.png')
    plots.roc_curves(confidences['test'], out, pngs['roc_curves'], title=f'ROC: {label}')
  row_titles = {
    'test': titles['test'],
    'noise': 'Noise',
    'adv_noise': 'Adv. noise',
    'adv_samples': 'Adv. samples',
  }
  if grid:
    pngs['image_grid'] = os.path.join(output_dir, 'image_grid.png')
    plots.image_grid(
      {row_titles[k]: v for k, v in grid.items()},
      class_names,
      pngs['image_grid'],
      title=f'Predicted class and confidence: {label}',
    )
  results['files'] = {k: os.path.basename(v) for k, v in pngs.items()}
  results['files'].update(results='results.json', table='table.md')

  with tf.io.gfile.GFile(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write(format_table(results))
  runs.write_json(os.path.join(output_dir, 'results.json'), _json_safe(results))

  writer = tf.summary.create_file_writer(output_dir)
  with writer.as_default(step=int(step)):
    for tag, value in summary_scalars(results).items():
      tf.summary.scalar(tag, value)
    for key, row in grid.items():
      tf.summary.image(f'eval/images/{key}', row[0], max_outputs=len(row[0]))
    for key, path in pngs.items():
      with tf.io.gfile.GFile(path, 'rb') as f:
        image = tf.io.decode_png(f.read(), channels=4)
      tf.summary.image(f'eval/plots/{key}', image[None], max_outputs=1)
    tf.summary.text('eval/table', format_table(results))
  writer.flush()
  writer.close()
  logging.info('Wrote %s', ', '.join(sorted(results['files'].values())) + f' to {output_dir}')


# ------------------------------------------------------------------------------------------------
# A run or an export.
# ------------------------------------------------------------------------------------------------


def accepts_unbounded_inputs(predict_fn, image_shape):
  """Whether predict_fn evaluates images outside [0, 1] (Table 2 scales noise by up to 1e6)."""
  try:
    predict_fn(tf.fill([1, *image_shape], 2.0))
  except tf.errors.InvalidArgumentError:
    return False
  return True


def _data_options(config):
  """How a folder:/npz: dataset was converted for the run (defaults without a config)."""
  return input_pipeline.options_from_config(config) if config is not None else None


def evaluate_run(settings, *, workdir=None, saved_model=None, dataset=None, output_dir=None):
  """Evaluates the latest checkpoint of `workdir`, or the SavedModel `saved_model`.

  Args:
    settings: Settings (seed None = the run's config.seed; data_dir '' = the run's).
    workdir: a training workdir (config.json and checkpoints/).
    saved_model: an export (version dir, or export dir with integer versions). Its config comes from
      `workdir` if given, else from the export's assets/metadata.json, else the paper's defaults.
    dataset: the in-distribution dataset; needed for a SavedModel whose metadata does not name it.
    output_dir: default workdir/eval; required without a workdir.

  Returns:
    The results dict of evaluate_model.
  """
  if not workdir and not saved_model:
    raise ValueError('Give a training --workdir, or --saved_model (or both).')
  config = runs.read_config(workdir) if workdir else None
  if saved_model:
    classifier = SavedModelClassifier(saved_model)
    if config is None and 'config' in classifier.metadata:
      config = ml_collections.ConfigDict(classifier.metadata['config'])
    names = {
      n for n in (dataset, config and config.dataset, classifier.metadata.get('dataset')) if n
    }
    if len(names) != 1:
      raise ValueError(
        'Cannot tell the in-distribution dataset of the SavedModel: '
        + (f'conflicting {sorted(names)}.' if names else 'pass --dataset.')
      )
    name = names.pop()
    info = known_datasets.get_info(
      name, settings.data_dir or (config and config.data_dir) or None, _data_options(config)
    )
    if tuple(info.image_shape) != classifier.image_shape:
      raise ValueError(
        f'The SavedModel takes images of shape {classifier.image_shape}, but '
        f'{name} has {info.image_shape}.'
      )
    exported_names = classifier.metadata.get('class_names')
    if exported_names is not None and list(exported_names) != list(info.class_names):
      raise ValueError(
        f'The SavedModel was exported with the classes {exported_names}, but {name} '
        f'now has {list(info.class_names)}: the data changed since the export.'
      )
    predict_fn, logits_fn = classifier.fns()
    keras_model, true_logits = None, classifier.has_logits
    step = int(classifier.metadata.get('step', 0))
    description = {
      'source': 'saved_model',
      'path': classifier.path,
      'attack_logits': 'logits output'
      if classifier.has_logits
      else 'log of the probabilities output',
    }
  else:
    model, config, info, step = runs.restore_model(workdir)
    if dataset and dataset != config.dataset:
      raise ValueError(f'--dataset={dataset} but the run in {workdir} trained on {config.dataset}.')
    predict_fn, logits_fn = keras_model_fns(model)
    keras_model, true_logits = model, True
    description = {
      'source': 'checkpoint',
      'path': os.path.abspath(workdir),
      'attack_logits': 'model logits',
    }
  if config is not None:
    description.update(method=config.method, model=config.model)
  if not output_dir:
    if not workdir:
      raise ValueError('--output_dir is required without --workdir (never write into an export).')
    output_dir = os.path.join(workdir, runs.EVAL)
  data_dir = settings.data_dir or (config.data_dir if config is not None else '')
  seed = (
    settings.seed if settings.seed is not None else (int(config.seed) if config is not None else 0)
  )
  settings = dataclasses.replace(settings, seed=seed, data_dir=data_dir)

  keys, _, run_table2, left_out = resolve_sets(settings, info.name)
  unavailable = {}
  if run_table2 and not accepts_unbounded_inputs(predict_fn, info.image_shape):
    reason = (
      'the model refuses inputs outside [0, 1] (an export whose serving_default checks '
      'its input range); Table 2 needs alpha * x far outside: evaluate the checkpoint '
      'with --workdir.'
    )
    if settings.strict:
      raise ValueError(f'Table 2 cannot be computed (--strict): {reason}')
    logging.warning('Skipping Table 2: %s', reason)
    unavailable[TABLE2] = reason
  out_sets, skipped = out_datasets.load_out_sets(
    keys,
    info.image_shape,
    batch_size=settings.batch_size,
    data_dir=data_dir,
    imagenet_minus_dir=settings.imagenet_minus_dir,
    max_examples=settings.max_examples,
    strict=settings.strict,
    seed=seed,
    image_dirs=dict(settings.image_dirs),
  )
  skipped.update(left_out)
  skipped.update(unavailable)
  test = None  # Data-free: evaluate_model runs what needs no in-distribution images.
  if info.has_data:
    test = input_pipeline.eval_dataset(
      info.name,
      'test',
      settings.batch_size,
      data_dir=data_dir or None,
      max_examples=settings.max_examples,
      options=_data_options(config),
    )
  return evaluate_model(
    predict_fn,
    info,
    test,
    settings,
    out_sets=out_sets,
    skipped=skipped,
    logits_fn=logits_fn,
    noise_config=config.noise if config is not None else None,
    output_dir=output_dir,
    step=step,
    description=description,
    keras_model=keras_model,
    true_logits=true_logits,
  )
