"""Table 1 and Table 2 of the paper (and the evaluations beyond it) for a trained run or an
exported SavedModel, with plots; and the same units for a training run's own evaluation. The
binary is acet_tf/evaluate.py; this module reads no flags.

Writes to the output directory (default WORKDIR/eval): results.json (every number and setting),
table.md (laid out like the paper's Table 1, plus Table 2), confidence_histograms.png,
roc_curves.png, image_grid.png and the same scalars and images as TensorBoard summaries
(acet_tf/evaluation/reporting.py).

Every evaluation runs the evaluator units of acet_tf/evaluation/units.py, chosen by Settings
(acet_tf/evaluation/settings.py):
  evaluate_model  any predict function and datasets -> the results dict;
  evaluate_run    restores a run or loads an export, loads the datasets, evaluate_model.
A training run's own evaluation (the trainer's, the export's) is training_sets.py, on the same
units.
"""

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
import dataclasses
import os
import time
from typing import Any

from absl import logging
import keras
import ml_collections
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.data import known_datasets
from acet_tf.data import out_datasets
from acet_tf.evaluation import reporting
from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import settings as settings_lib
from acet_tf.evaluation import units
from acet_tf.ops import noise as noise_lib


def evaluate_model(
  predict_fn: Callable[[tf.Tensor], tf.Tensor],
  info: input_pipeline.DatasetInfo,
  test_batches: Iterable[tuple[Any, Any]] | None,
  settings: settings_lib.Settings,
  *,
  out_sets: Mapping[str, Iterable[Any]] | None = None,
  skipped: Mapping[str, str] | None = None,
  logits_fn: Callable[[tf.Tensor], tf.Tensor] | None = None,
  noise_config: ml_collections.ConfigDict | None = None,
  output_dir: str | None = None,
  step: int = 0,
  description: Mapping[str, Any] | None = None,
  keras_model: keras.Model | None = None,
  true_logits: bool = False,
) -> dict[str, Any]:
  """Table 1 and Table 2 for one model; the binary only calls this (via evaluate_run) and prints.

  Args:
    predict_fn: images float32 [B, H, W, C] in [0, 1] -> probabilities float32 [B, K].
    info: input_pipeline.DatasetInfo of the in-distribution set.
    test_batches: iterable of (images float32 [b, H, W, C] in [0, 1], labels int [b]) of the
      in-distribution test set (capped at settings.max_examples); None when the data is not on
      this machine: then there is no test row, no AUROC/FPR/AUPR, no adversarial samples, and the
      noise sets are uniform noise only (the permuted half needs images), all said in
      results['data_free'] and the table.
    settings: settings_lib.Settings. Its `sets` picks the generated sets and Table 2 (the
      out-datasets are the ones given in `out_sets`); settings.seed must be set.
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
  start = time.time()
  # The p_out block is the same for every method of base_config (only its ratio differs).
  noise_config = noise_config or noise_lib.paper_noise_config()
  results = reporting.new_results(
    info, settings, noise_config, step=step, description=description, skipped=dict(skipped or {})
  )
  ctx = units.Context(
    predict_fn,
    logits_fn or saved_model_classifier.log_probabilities(predict_fn),
    settings,
    info,
    test_batches,
    noise_config,
    results,
    out_sets=dict(out_sets or {}),
    keras_model=keras_model,
    true_logits=true_logits,
  )
  units.run(ctx)
  results['timing']['total'] = time.time() - start
  if output_dir:
    reporting.write_outputs(
      results,
      output_dir,
      confidences=ctx.confidences,
      titles=ctx.titles,
      grid=ctx.grid,
      class_names=info.class_names,
      step=step,
    )
  return results


# ------------------------------------------------------------------------------------------------
# A run or an export.
# ------------------------------------------------------------------------------------------------


def _data_options(config):
  """How a folder:/npz: dataset was converted for the run (defaults without a config)."""
  return input_pipeline.options_from_config(config) if config is not None else None


def evaluate_run(
  settings: settings_lib.Settings,
  *,
  workdir: str | None = None,
  saved_model: str | None = None,
  model: keras.Model | None = None,
  dataset: str | None = None,
  output_dir: str | None = None,
  noise_config: ml_collections.ConfigDict | None = None,
  description: Mapping[str, Any] | None = None,
  step: int = 0,
) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir`, the SavedModel `saved_model` or a Keras `model`.

  Args:
    settings: Settings (seed None = the run's config.seed; data_dir '' = the run's).
    workdir: a training workdir (config.json and checkpoints/).
    saved_model: an export (version dir, or export dir with integer versions). Its config comes from
      `workdir` if given, else from the export's assets/metadata.json, else the paper's defaults.
    model: a Keras classifier in memory (images float32 [B, H, W, C] in [0, 1] -> logits [B, K]),
      e.g. one trained with acet_tf.keras; then `dataset` names its in-distribution dataset.
    dataset: the in-distribution dataset; needed for a SavedModel whose metadata does not name it
      and for `model`.
    output_dir: default workdir/eval; required without a workdir.
    noise_config: the p_out settings of `model` (its training noise); default the paper's. A run
      or an export uses its config's.
    description: facts about `model` for the results (method, ...).
    step: the training step of `model`, for the results and summaries.

  Returns:
    The results dict of evaluate_model.
  """
  if sum(map(bool, (workdir or saved_model, model is not None))) != 1:
    raise ValueError('Give a training --workdir, or --saved_model (or both), or a Keras model.')
  config = runs.read_config(workdir) if workdir else None
  if model is not None:
    if not dataset:
      raise ValueError('Name the in-distribution dataset of the Keras model: dataset=...')
    info = known_datasets.info_or_recorded(dataset, settings.data_dir or None, None)
    shape = tuple(model.input_shape[1:])
    if shape != tuple(info.image_shape):
      raise ValueError(
        f'The Keras model {model.name!r} takes images of shape {shape}, but {dataset} has '
        f'{tuple(info.image_shape)}.'
      )
    predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
    keras_model, true_logits = model, True
    description = {'source': 'keras_model', 'name': model.name, **(description or {})}
  elif saved_model:
    classifier = saved_model_classifier.SavedModelClassifier(saved_model)
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
    info = known_datasets.info_or_recorded(
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
    predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
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

  keys, _, run_table2, left_out = settings_lib.resolve_sets(settings, info.name)
  unavailable = {}
  if run_table2 and not saved_model_classifier.accepts_unbounded_inputs(
    predict_fn, info.image_shape
  ):
    reason = (
      'the model refuses inputs outside [0, 1] (an export whose serving_default checks '
      'its input range); Table 2 needs alpha * x far outside: evaluate the checkpoint '
      'with --workdir.'
    )
    if settings.strict:
      raise ValueError(f'Table 2 cannot be computed (--strict): {reason}')
    logging.warning('Skipping Table 2: %s', reason)
    unavailable[settings_lib.TABLE2] = reason
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
    noise_config=config.noise if config is not None else noise_config,
    output_dir=output_dir,
    step=step,
    description=description,
    keras_model=keras_model,
    true_logits=true_logits,
  )
