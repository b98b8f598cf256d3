"""The evaluator units: each evaluates one kind of set and writes its named entries.

A unit is a function of a Context: the model's predict and logits functions, the Settings, the test
batches and their confidences, the results dict, and the confidences, titles and image grid that
the plots take. UNITS names them in the order they run; Context picks from the Settings which run
(as resolve_sets and the binary always did), and `run` runs them. What each writes:

  test         results['test']: error, MMC and per-class numbers (data-free: None, and
               results['data_free'] says what is not run); its confidences are the positives of
               every detection metric.
  out_sets     results['out_sets'][key] of each out-dataset given.
  noise        results['out_sets']['noise']: the training p_out made from the test images.
  adv_noise    results['out_sets']['adv_noise']: PGD on the max log-confidence from the noise.
  adv_samples  results['out_sets']['adv_samples']: PGD on the test set's cross-entropy.
  attacked     results['attacked']: worst case over attacks per start distribution, IBP bounds.
  scores       results['scores']: max softmax, max logit and energy on the same forward passes.
  table2       results['table2']: the alpha at which alpha * uniform noise becomes overconfident.

acet_tf.evaluation.evaluator runs them all for Table 1 and 2, and test, noise and adv_noise for the
trainer's periodic evaluation and the export's accept rates, which also read the per-set
predictions_lib.Predictions and batches the units keep in the Context.
"""

from collections.abc import Callable
from collections.abc import Iterable
import dataclasses
import json
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf.data import input_pipeline
from acet_tf.evaluation import alpha_search
from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.evaluation import reporting
from acet_tf.evaluation import robust_metrics
from acet_tf.evaluation import scores as scores_lib
from acet_tf.evaluation import settings as settings_lib
from acet_tf.ops import pgd

# The reference counts an adversarial sample as resisted only if the true class is the argmax AND
# has probability above 1.01 / K (a near-uniform prediction is not a correct one).
RESISTED_FACTOR = 1.01


def empty_results():
  """The parts of a results dict that the units write into (reporting.new_results has them)."""
  return {'out_sets': {}, 'skipped': {}, 'timing': {}}


@dataclasses.dataclass
class Context:
  """What the units share: the inputs, and the intermediates later units and the plots read
  (batches, predictions, confidences). A unit's results are what it returns; run() merges them
  into `results`, which the units only read.

  `units` (the names that run, in UNITS order) is chosen from the settings unless given.
  """

  predict_fn: Callable  # images float32 [B, H, W, C] in [0, 1] -> probabilities float32 [B, K].
  logits_fn: Callable  # images -> logits (or log-probabilities) for the attacks.
  settings: settings_lib.Settings  # settings.seed set.
  info: input_pipeline.DatasetInfo
  test_batches: Iterable | None  # (images, labels) of the test set; None: data not here.
  noise_config: Any  # The p_out settings (config.noise).
  results: dict  # Needs 'out_sets', 'skipped' and 'timing' (empty_results()).
  out_sets: dict = dataclasses.field(default_factory=dict)  # {key: batches of images}.
  keras_model: Any = None  # The Keras model behind logits_fn, for the IBP bounds.
  true_logits: bool = False  # logits_fn gives logits: score every clean set three ways.
  units: tuple[str, ...] | None = None
  # From the above.
  requested: tuple[str, ...] = dataclasses.field(init=False)  # settings_lib.requested_sets.
  cap: int = dataclasses.field(init=False)  # settings.max_examples, or no cap.
  scores_fn: Callable | None = dataclasses.field(init=False)  # With true_logits.
  # Intermediates, kept by the units.
  in_conf: np.ndarray | None = None  # float32 [N] test-set confidences; None data-free.
  batches: dict = dataclasses.field(default_factory=dict)  # {set: [(images, labels)]}.
  predictions: dict = dataclasses.field(default_factory=dict)  # {set: predictions_lib.Predictions}.
  seconds: dict = dataclasses.field(default_factory=dict)  # {generated set: time to make it}.
  confidences: dict = dataclasses.field(default_factory=dict)  # {set: float [N]}, the plots'.
  titles: dict = dataclasses.field(default_factory=dict)  # {set: title}, the plots'.
  grid: dict = dataclasses.field(default_factory=dict)  # {set: image grid row}.
  set_scores: dict = dataclasses.field(default_factory=dict)  # {set: {score: float [N]}}.

  def __post_init__(self):
    if self.settings.seed is None:
      raise ValueError('settings.seed must be set (evaluate_run takes it from the run config).')
    self.requested = settings_lib.requested_sets(self.settings, self.results['skipped'])
    if self.units is None:
      self.units = select_units(
        self.settings,
        self.requested,
        has_data=self.test_batches is not None,
        true_logits=self.true_logits,
      )
    self.cap = self.settings.max_examples or np.iinfo(np.int64).max
    self.scores_fn = scores_lib.make_scores_fn(self.logits_fn) if self.true_logits else None
    name = reporting.DATASET_TITLES.get(self.info.name, self.info.name)
    self.titles['test'] = f'{name} (test)'

  def attack_model(self, images, training=False):
    """The model interface of predictions_lib.attack_batches."""
    del training  # logits_fn is always inference mode.
    return self.logits_fn(images)

  def predict(self, key, batches):
    """Predictions on a clean set, kept as predictions[key]; with true logits also its scores."""
    if self.scores_fn is None:
      pred = predictions_lib.predict_batches(self.predict_fn, batches)
    else:
      s, predicted, labels = scores_lib.score_batches(self.scores_fn, batches)
      self.set_scores[key] = s
      pred = predictions_lib.Predictions(s['max_softmax'], predicted, labels)
    self.predictions[key] = pred
    return pred

  def generated(self, key):
    """The batches of 'noise' or 'adv_noise' (both made at the first call; the attack only if the
    adv_noise unit runs)."""
    if 'noise' not in self.batches:
      s, attack = self.settings, None
      if 'adv_noise' in self.units:
        attack = predictions_lib.NoiseAttack(
          self.attack_model,
          eps=s.adv_noise_eps,
          step_size=s.adv_noise_step_size,
          steps=s.adv_noise_steps,
          restarts=s.adv_noise_restarts,
          num_images=s.adv_noise_examples,
        )
      made = predictions_lib.generated_sets(self.batches['test'], s.seed, self.noise_config, attack)
      self.batches['noise'] = made.noise
      if made.adv_noise is not None:
        self.batches['adv_noise'] = made.adv_noise
      self.seconds.update(made.seconds)
    return self.batches[key]

  def out_set_entry(self, key, conf, title, extra=None, seconds=0.0):
    """{'out_sets': {key: metrics}} of out-set confidences `conf` float [M] against the test
    set's; keeps conf and title for the plots."""
    if self.in_conf is None:  # No test-set confidences: MMC only, the rest absent (not invented).
      entry = {
        'mmc': ood_metrics.mean_max_confidence(conf),
        'auroc': None,
        'aupr_in': None,
        'aupr_out': None,
        'fpr95': None,
      }
    else:
      entry = ood_metrics.ood_metrics(self.in_conf, conf)
    entry['num_examples'] = int(np.size(conf))
    entry.update(extra or {})
    entry.update(title=title, seconds=seconds)
    self.confidences[key] = conf
    self.titles[key] = title
    logging.info(
      '%s: %d images, MMC %.3f, AUROC %s, FPR@95 %s, %.1f s',
      key,
      np.size(conf),
      entry['mmc'],
      reporting.fmt(entry['auroc']),
      reporting.fmt(entry['fpr95']),
      seconds,
    )
    return {'out_sets': {key: entry}}

  def add_grid_row(self, key, batches, pred, labels=False):
    """The image grid's row of a set: its first num_grid_images images and predictions."""
    n = self.settings.num_grid_images
    row = (_concat_images(batches, n), pred.predicted[:n], pred.confidence[:n])
    self.grid[key] = row + ((pred.labels[:n],) if labels else ())


# ------------------------------------------------------------------------------------------------
# The units.
# ------------------------------------------------------------------------------------------------


def test_unit(ctx):
  if ctx.test_batches is None:
    ctx.batches['test'], entries = _data_free(ctx)
    return entries
  t = time.time()
  test = [
    (tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32))
    for x, y in predictions_lib.take_examples(ctx.test_batches, ctx.cap)
  ]
  ctx.batches['test'] = test
  pred = ctx.predict('test', test)
  ctx.in_conf = pred.confidence
  entry = {
    'error': ood_metrics.error_rate(pred.predicted, pred.labels),
    'mmc': ood_metrics.mean_max_confidence(ctx.in_conf),
    'num_examples': int(ctx.in_conf.size),
    'per_class': reporting.per_class_metrics(pred, ctx.info.class_names),
  }
  ctx.confidences['test'] = ctx.in_conf
  ctx.add_grid_row('test', test, pred, labels=True)
  logging.info(
    'test: %d images, error %.2f%%, MMC %.3f, %.1f s',
    ctx.in_conf.size,
    100 * entry['error'],
    entry['mmc'],
    time.time() - t,
  )
  return {'test': entry, 'timing': {'test': time.time() - t}}


def out_sets_unit(ctx):
  entries = {}
  for key, batches in ctx.out_sets.items():
    t = time.time()
    pred = ctx.predict(key, predictions_lib.take_examples(_zero_labels(batches), ctx.cap))
    title = reporting.set_title(key)
    _merge(entries, ctx.out_set_entry(key, pred.confidence, title, seconds=time.time() - t))
  return entries


def noise_unit(ctx):
  noise = ctx.generated('noise')
  t = time.time()
  pred = ctx.predict('noise', noise)
  seconds = ctx.seconds['noise'] + time.time() - t
  ctx.add_grid_row('noise', noise, pred)
  title = reporting.noise_title('noise', ctx.results)
  return ctx.out_set_entry('noise', pred.confidence, title, seconds=seconds)


def adv_noise_unit(ctx):
  adv = ctx.generated('adv_noise')
  t = time.time()
  pred = predictions_lib.predict_batches(ctx.predict_fn, adv)
  ctx.predictions['adv_noise'] = pred
  s = ctx.settings
  ctx.add_grid_row('adv_noise', adv, pred)
  return ctx.out_set_entry(
    'adv_noise',
    pred.confidence,
    reporting.noise_title('adv_noise', ctx.results),
    seconds=ctx.seconds['adv_noise'] + time.time() - t,
    extra={
      'eps': s.adv_noise_eps,
      'step_size': s.adv_noise_step_size,
      'steps': s.adv_noise_steps,
      'restarts': s.adv_noise_restarts,
    },
  )


def adv_samples_unit(ctx):
  t = time.time()
  s, info = ctx.settings, ctx.info
  eps, step_size = settings_lib.adv_samples_budget(s, info.image_shape)
  adv = list(
    predictions_lib.attack_batches(
      ctx.attack_model,
      ctx.batches['test'],
      pgd.cross_entropy_objective,
      eps=eps,
      step_size=step_size,
      steps=s.adv_samples_steps,
      seed=predictions_lib.eval_seed(s.seed, predictions_lib.ADV_SAMPLES_STREAM),
      name='adv_samples',
    )
  )
  ctx.batches['adv_samples'] = adv
  pred = predictions_lib.predict_batches(ctx.predict_fn, adv)
  ctx.predictions['adv_samples'] = pred
  entry, success = adversarial_sample_metrics(
    ctx.in_conf, pred.confidence, pred.predicted, pred.labels, info.num_classes
  )
  entry.update(
    eps=eps,
    step_size=step_size,
    steps=s.adv_samples_steps,
    title=reporting.SET_TITLES['adv_samples'],
    seconds=time.time() - t,
  )
  entry['num_examples'] = entry['num_successful']
  ctx.titles['adv_samples'] = 'Adv. Samples (successful)'
  if success.any():
    ctx.confidences['adv_samples'] = pred.confidence[success]
  logging.info(
    'adv_samples: %d attacked, success rate %.1f%%, MMC (successful) %s, %.1f s',
    entry['num_attacked'],
    100 * entry['success_rate'],
    reporting.fmt(entry['mmc']),
    entry['seconds'],
  )
  # Successful ones first: they are the ones the row is about.
  order = np.argsort(~success, kind='stable')[: s.num_grid_images]
  images = np.concatenate([np.asarray(b[0]) for b in adv])
  ctx.grid['adv_samples'] = (
    images[order],
    pred.predicted[order],
    pred.confidence[order],
    pred.labels[order],
  )
  return {'out_sets': {'adv_samples': entry}}


def attacked_unit(ctx):
  """results['attacked'] (worst case, per attack, guaranteed) for settings.attacked_sets."""
  t = time.time()
  s, out_sets = ctx.settings, ctx.out_sets
  n = s.attacked_max_examples or ctx.cap
  keys = []
  for name in s.attacked_sets:
    keys += list(out_sets) if name == settings_lib.ATTACK_ALL_OUT_SETS else [name]
  sets, eps_of, extra, skipped = {}, {}, {}, {}
  out_eps = s.attacked_eps or robust_metrics.default_attack_eps(ctx.info.name, ctx.info.image_shape)
  for key in dict.fromkeys(keys):
    if key == 'adv_noise':
      source = list(predictions_lib.take_examples(ctx.batches['test'], n))
      starts = {}
      if 'noise' in s.adv_noise_starts:
        if 'noise' in ctx.batches:
          starts['noise'] = list(predictions_lib.take_examples(ctx.batches['noise'], n))
        else:
          starts['noise'] = predictions_lib.generated_sets(source, s.seed, ctx.noise_config).noise
      if 'uniform' in s.adv_noise_starts:
        starts['uniform'] = list(
          robust_metrics.uniform_batches(
            source, predictions_lib.eval_seed(s.seed, robust_metrics.UNIFORM_STREAM)
          )
        )
      sets[key], eps_of[key] = starts, s.adv_noise_eps
      if 'adv_noise' in ctx.confidences and 'noise' in starts:
        # The paper's attack on the same noise images: by construction under the worst case.
        extra[key] = {'paper@noise': ctx.confidences['adv_noise'][:n]}
    elif key in out_sets:
      sets[key] = {'image': list(predictions_lib.take_examples(_zero_labels(out_sets[key]), n))}
      eps_of[key] = out_eps
    elif key not in ctx.results['skipped']:
      skipped[f'attacked/{key}'] = 'not loaded: add it to --sets (or it could not be loaded).'
  if s.guaranteed and ctx.keras_model is None:
    skipped['guaranteed'] = (
      'IBP needs the Keras model (evaluate the checkpoint with --workdir, not a SavedModel).'
    )
  attacked = robust_metrics.evaluate_attacked_sets(
    sets,
    logits_fn=ctx.logits_fn,
    predict_fn=ctx.predict_fn,
    in_conf=ctx.in_conf,
    attack_list=s.attacks,
    eps_of=eps_of,
    seed=s.seed,
    bound_model=ctx.keras_model,
    guaranteed_metrics=s.guaranteed,
    extra=extra,
    log=logging.info,
  )
  return {'attacked': attacked, 'skipped': skipped, 'timing': {'attacked': time.time() - t}}


def scores_unit(ctx):
  test = ctx.set_scores['test']
  scores = {
    key: {
      name: scores_lib.detection_metrics(test[name], values[name]) for name in scores_lib.SCORES
    }
    for key, values in ctx.set_scores.items()
    if key != 'test'
  }
  return {'scores': scores, 'definitions': {'scores': scores_lib.__doc__}}


def table2_unit(ctx):
  t = time.time()
  s = ctx.settings
  summary, _, _ = alpha_search.table2(
    ctx.predict_fn,
    ctx.info.image_shape,
    seed=predictions_lib.eval_seed(s.seed, alpha_search.TABLE2_STREAM),
    num_examples=settings_lib.table2_examples(s),
    batch_size=s.batch_size,
    threshold=s.table2_threshold,
    alpha_max=s.table2_alpha_max,
    clipped_threshold=s.table2_clipped_threshold,
  )
  summary['seconds'] = time.time() - t
  logging.info(
    'table2: %d draws, median alpha %s, unreached %.1f%%, overconfident after '
    'clipping %.1f%%, %.1f s',
    summary['num_examples'],
    reporting.fmt_alpha(summary['median'], summary['alpha_max']),
    100 * summary['share_unreached'],
    100 * summary['share_overconfident_clipped'],
    summary['seconds'],
  )
  return {'table2': summary}


UNITS = {
  'test': test_unit,
  'out_sets': out_sets_unit,
  'noise': noise_unit,
  'adv_noise': adv_noise_unit,
  'adv_samples': adv_samples_unit,
  'attacked': attacked_unit,
  'scores': scores_unit,
  settings_lib.TABLE2: table2_unit,
}


def select_units(settings, requested, *, has_data, true_logits):
  """The names of UNITS that run, in order, for `requested` (settings_lib.requested_sets).

  Always the test set and the out-sets given; the generated sets and Table 2 as requested
  (adversarial samples need the test images); the attacked sets if settings name any; the scores
  with true logits and the test set.
  """
  chosen = {'test', 'out_sets'} | (
    set(requested) & {*settings_lib.GENERATED_SETS, settings_lib.TABLE2}
  )
  if not has_data:
    chosen.discard('adv_samples')
  if settings.attacked_sets:
    chosen.add('attacked')
  if true_logits and has_data:
    chosen.add('scores')
  return tuple(name for name in UNITS if name in chosen)


def run(ctx):
  """Runs ctx.units in order, merging the entries each returns into ctx.results; returns ctx.

  A unit returns its part of the results tree ({'test': ..., 'timing': {'test': s}}, ...) and
  keeps in ctx only what later units or the plots read (batches, predictions, confidences).
  """
  for name in ctx.units:
    _merge(ctx.results, UNITS[name](ctx))
  return ctx


def _merge(results, entries):
  """Adds `entries` to `results`: a dict entry into the dict already there (out_sets, skipped,
  timing, noise_config), any other as the value of its key."""
  for key, value in entries.items():
    if isinstance(value, dict) and isinstance(results.get(key), dict):
      results[key].update(value)
    else:
      results[key] = value


# ------------------------------------------------------------------------------------------------
# Pieces.
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
    ood_metrics.ood_metrics of the successful samples only (None each if there is none).
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
    'mmc_all': ood_metrics.mean_max_confidence(confidence),
  }
  if success.any():
    entry.update(ood_metrics.ood_metrics(in_confidences, confidence[success]))
  else:
    entry.update(dict.fromkeys(('mmc', 'auroc', 'aupr_in', 'aupr_out', 'fpr95')))
  return entry, success


def _data_free(ctx):
  """The test unit's stand-ins when the in-distribution data is absent.

  Sets the noise to uniform noise only. Returns the source batches of zero images for the noise
  (as many as max_examples, else the test set's recorded size) and the results entries: what is
  not run (data_free, adv_samples in the skipped sets), test None, the noise config used.
  """
  info = ctx.info
  entries = {'skipped': {}}
  reason = (
    f'the {info.name} data is not on this machine (recorded shape and classes used, see '
    'known_datasets)'
  )
  notes = {
    'test': f'not run: {reason}.',
    'auroc': 'AUROC, FPR@95 and AUPR need the test-set confidences: absent, not computed.',
  }
  if 'noise' in ctx.requested or 'adv_noise' in ctx.requested:
    notes['noise'] = (
      f"{reporting.UNIFORM_ONLY}: the permuted half of the paper's noise permutes "
      f'{info.name} images; every noise image here is blurred uniform noise.'
    )
  if 'adv_samples' in ctx.requested:
    entries['skipped']['adv_samples'] = f'needs the test set: {reason}.'
  entries.update(data_free=notes, test=None)
  logging.warning('No in-distribution data: %s', ' '.join(notes.values()))
  noise_config = ml_collections.ConfigDict(dict(ctx.noise_config), type_safe=False)
  noise_config.permuted_fraction = 0.0  # Nothing to permute: uniform start only.
  ctx.noise_config = noise_config
  entries['noise_config'] = json.loads(noise_config.to_json())
  n, size = int(min(ctx.cap, info.num_test_examples)), ctx.settings.batch_size
  batches = [
    (
      tf.zeros([min(size, n - i), *info.image_shape], tf.float32),
      tf.zeros([min(size, n - i)], tf.int32),
    )
    for i in range(0, n, size)
  ]
  return batches, entries


def _zero_labels(batches):
  for images in batches:
    if isinstance(images, (tuple, list)):
      images = images[0]
    yield images, tf.zeros(tf.shape(images)[:1], tf.int32)


def _concat_images(batches, n):
  """First n images of batches of (images, labels) as numpy float32."""
  return np.concatenate([np.asarray(b[0]) for b in predictions_lib.take_examples(batches, n)])[:n]
