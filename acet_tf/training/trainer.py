"""The training loop: `train_and_evaluate(config, workdir)` trains plain, CEDA or ACET per the
config and resumes by itself from the workdir. The binary is acet_tf/train.py; this module reads
no flags.
"""

from collections.abc import Sequence
import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf import models
from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.data import outlier_data
from acet_tf.evaluation import training_sets
from acet_tf.training import distribution
from acet_tf.training import train_step

# ----------------------------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------------------------


def validate_config(config):
  """Raises ValueError naming the key for any inconsistent or out-of-range setting."""

  def check(ok, message):
    if not ok:
      raise ValueError(f'Bad config: {message}')

  train_step.validate_step_config(config)  # method, noise, pgd, weight decay.
  check(bool(config.dataset), 'dataset is empty')
  try:
    input_pipeline.options_from_config(config)
  except ValueError as e:
    check(False, str(e))
  try:
    models.check_name(config.model)
  except ValueError as e:
    check(False, f'model: {e}')
  check(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  check(
    config.num_epochs > 0 or config.num_train_steps > 0, 'set num_epochs > 0 or num_train_steps > 0'
  )
  if config.method != 'plain':
    try:
      outlier_data.check_out_data(config.out_data, config.dataset)
    except outlier_data.OutlierDataError as e:
      check(False, str(e))
  if config.method in ('good', 'prood'):
    check(
      config.mixed_precision == '',
      f'method {config.method} computes its IBP bounds in float32; train it without '
      'mixed_precision (a bound through float16 activations would not be a bound)',
    )
  if config.method == 'prood' and config.classifier_workdir:
    check(
      tf.io.gfile.exists(os.path.join(config.classifier_workdir, runs.CONFIG)),
      f'classifier_workdir {config.classifier_workdir} holds no run ({runs.CONFIG} missing)',
    )
  check(
    config.mixed_precision in ('', 'mixed_float16', 'mixed_bfloat16'),
    f'mixed_precision must be "", "mixed_float16" or "mixed_bfloat16", got '
    f'{config.mixed_precision!r}',
  )
  for key in ('log_every_steps', 'checkpoint_every_steps', 'steps_per_call', 'max_checkpoints'):
    check(config[key] > 0, f'{key} must be > 0, got {config[key]}')
  check(config.eval.every_steps > 0, f'eval.every_steps must be > 0, got {config.eval.every_steps}')


# ----------------------------------------------------------------------------------------------
# Logging helpers.
# ----------------------------------------------------------------------------------------------


def window_metrics(sums, learning_rate):
  """Turns summed METRIC_SUMS over a window of steps into the train/ scalars."""
  steps = max(sums['steps'], 1)
  metrics = {
    'train/loss': sums['loss'] / steps,
    'train/loss_in': sums['loss_in'] / max(sums['count_in'], 1),
    'train/error': sums['errors'] / max(sums['count_in'], 1),
    'train/mmc_in': sums['conf_in'] / max(sums['count_in'], 1),
    'train/learning_rate': learning_rate,
  }
  if sums['count_out'] > 0:
    metrics['train/loss_out'] = sums['loss_out'] / sums['count_out']
    metrics['train/mmc_out'] = sums['conf_out'] / sums['count_out']
  return metrics


def write_scalars(writer, step, scalars):
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.scalar(name, value)
  writer.flush()


def format_duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------


def total_train_steps(config, info):
  steps_per_epoch = info.num_train_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(
      f'Too few examples for a batch: batch_size {config.batch_size} exceeds the '
      f'{info.num_train_examples} training examples of {config.dataset}.'
    )
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return config.num_epochs * steps_per_epoch, steps_per_epoch


def build_model_and_optimizer(config, info, total_steps, strategy):
  """Model, optimizer and checkpoint, created in the strategy's scope."""
  if config.mixed_precision:
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    if config.mixed_precision == 'mixed_float16' and not tf.config.list_logical_devices('GPU'):
      # Measured 8 December on an Intel Emerald Rapids: a LeNet pass 200x slower than float32.
      logging.warning(
        "mixed_float16 without a GPU: TensorFlow's float16 CPU kernels can be far slower than "
        'float32 (BUILD.md, "GPU options"); mixed_float16 is meant for GPUs.'
      )
  with strategy.scope():
    model = models.model_for_config(config, info.image_shape, info.num_classes)
    if config.method == 'prood' and config.classifier_workdir:
      # ProoD on a trained classifier: its weights from that run, frozen (the optimizer gets the
      # discriminator's variables only). On resume the checkpoint below restores the same ones.
      step = runs.restore_classifier(model.classifier, config.classifier_workdir, config)
      model.classifier.trainable = False
      logging.info('Classifier from %s (step %d), frozen.', config.classifier_workdir, step)
    optimizer = train_step.create_optimizer(config, total_steps)
    # Built here, not lazily in the first distributed step (that fails with a placeholder error).
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
  return model, optimizer, checkpoint


def check_model_fits_data(config, info, model):
  """Raises ValueError naming the dataset and both shapes if `model` cannot take its images."""
  if tuple(model.input_shape[1:]) != tuple(info.image_shape):
    raise ValueError(
      f'Dataset {config.dataset} has images of shape {tuple(info.image_shape)} '
      f'but model {config.model} takes {tuple(model.input_shape[1:])}.'
    )


def train_iterator(config, info, strategy, start_step):
  """The distributed training batches from `start_step` on, sharded over the input pipelines.

  Each replica gets images float32 [B / replicas, H, W, C] in [0, 1] and labels int32. On one
  worker, replica r gets the r-th slice of the single-device global batch, so the update equals
  the single-device one; several workers each read a disjoint shard of every epoch.
  Reads the whole train split into memory first: an unreadable split fails here, before step one.
  """
  dataset = strategy.distribute_datasets_from_function(
    lambda ctx: input_pipeline.train_dataset(config, info, start_step=start_step, input_context=ctx)
  )
  return iter(dataset)


@dataclasses.dataclass
class HookContext:
  """What a hook sees after a train call: the live model and optimizer, the run's workdir and
  total steps, and the train/ metrics of the last logged window ({} before the first log)."""

  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  workdir: str
  total_steps: int
  train_metrics: dict


def log_train_window(
  writer,
  window,
  step,
  start_step,
  total_steps,
  steps_per_epoch,
  optimizer,
  elapsed_window,
  elapsed_total,
):
  """Writes the train/ scalars of a window of steps and logs one progress line; returns them."""
  lr = optimizer.learning_rate
  lr = float(lr.numpy()) if hasattr(lr, 'numpy') else float(lr)
  metrics = window_metrics(window, lr)
  metrics['train/images_per_second'] = window['count_in'] / max(elapsed_window, 1e-9)
  write_scalars(writer, step, metrics)
  rate = (step - start_step) / max(elapsed_total, 1e-9)
  logging.info(
    'step %d/%d epoch %.2f | loss %.4f err %.2f%% mmc_in %.3f%s | %.0f img/s | ETA %s',
    step,
    total_steps,
    step / steps_per_epoch,
    metrics['train/loss'],
    100 * metrics['train/error'],
    metrics['train/mmc_in'],
    f' mmc_out {metrics["train/mmc_out"]:.3f}' if 'train/mmc_out' in metrics else '',
    metrics['train/images_per_second'],
    format_duration((total_steps - step) / max(rate, 1e-9)),
  )
  return metrics


def outlier_banks(config, info):
  """{source: uint8 [M, H, W, C]} of config.out_data's image sources, read and checked now (a bad
  source fails before step one, naming it); empty for plain training or the paper's noise alone."""
  if config.method == 'plain':
    return {}
  banks = {}
  for source in outlier_data.image_sources(config.out_data):
    images = outlier_data.load_outlier_images(
      source,
      info.image_shape,
      num_photos=config.out_data.num_photos,
      data_dir=config.data_dir or None,
      seed=config.seed,
    )
    banks[source] = tf.constant(np.round(images * 255.0).astype(np.uint8))
    logging.info('Outliers %s: %d images of shape %s.', source, len(images), info.image_shape)
  return banks


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, hooks: Sequence[Any] = ()
) -> dict[str, Any]:
  """Trains per `config`, checkpointing to and resuming from `workdir`.

  Resume order: the latest checkpoint in workdir/checkpoints (model, optimizer state and step;
  the learning rate and data position follow from the step), else a fresh start. Every worker
  restores from there; only the chief writes into workdir.

  Everything that can be checked is checked before the first step: the config, the dataset
  (readable, image shape = model input), the checkpoint (fits the model; the same on every worker).
  A SIGTERM (on any worker) saves a checkpoint and exits with code 143; rerunning the same command
  continues to exactly the configured number of steps. A non-finite loss or gradient raises
  FloatingPointError naming the step, without saving.

  `hooks`: callables `hook(step, context)` run after every train call (context: HookContext), in
  order, before the preemption check, the periodic checkpoint and the periodic evaluation of that
  step. For progress reports, profiling, custom stopping and fault injection in tests.

  Returns:
    The final metrics (the chief also writes them to workdir/final_metrics.json): step,
    test/error, test/mmc, noise/mmc, adv_noise/mmc and the last train/ window. Other workers of
    a multi-worker run skip the evaluation and return step and train/ metrics only.
  """
  validate_config(config)
  # Before anything else runs TF: multi_worker configures collective ops at startup.
  strategy = distribution.create_strategy(config.strategy, config.tpu_address)
  if config.batch_size % strategy.num_replicas_in_sync:
    raise ValueError(
      f'batch_size {config.batch_size} is not divisible by the '
      f'{strategy.num_replicas_in_sync} replicas.'
    )
  chief = distribution.is_chief(strategy)
  data_dir = config.data_dir or None
  options = input_pipeline.options_from_config(config)  # How folder:/npz: images are converted.
  info = input_pipeline.get_info(config.dataset, data_dir, options)  # Fails fast if unavailable.
  total_steps, steps_per_epoch = total_train_steps(config, info)
  # The initial weights follow config.seed, so a rerun from scratch repeats the run exactly.
  keras.utils.set_random_seed(config.seed)
  model, optimizer, checkpoint = build_model_and_optimizer(config, info, total_steps, strategy)
  check_model_fits_data(config, info, model)
  if chief:  # Only the chief evaluates; a bad test split would fail the first evaluation.
    input_pipeline.check_readable(
      config.dataset,
      'test',
      info.image_shape,
      data_dir=data_dir,
      max_examples=config.eval.max_examples,
      options=options,
    )

  tf.io.gfile.makedirs(workdir)
  runs.check_resumable(config, workdir)
  checkpoints = distribution.WorkerCheckpoints(
    strategy, checkpoint, runs.checkpoint_dir(workdir), config.max_checkpoints
  )
  latest = checkpoints.latest
  if latest:
    runs.restore_checkpoint(checkpoint, latest, config, info)
    logging.info('Resumed from %s.', latest)
  start_step = int(optimizer.iterations.numpy())
  distribution.check_same_on_all_workers(strategy, start_step, 'the step to resume from')
  if chief:
    runs.write_config(workdir, config)
  writer = tf.summary.create_file_writer(workdir) if chief else tf.summary.create_noop_writer()

  iterator = train_iterator(config, info, strategy, start_step)
  noise_fn = train_step.out_distribution(config, outlier_banks(config, info))
  train_steps = train_step.make_train_function(
    model, optimizer, config, strategy, noise_fn, total_steps
  )
  test_dataset = input_pipeline.eval_dataset(
    config.dataset,
    'test',
    config.eval.batch_size,
    data_dir=data_dir,
    max_examples=config.eval.max_examples,
    options=options,
  )

  def run_eval(step):
    scalars, images = training_sets.evaluate_during_training(model, config, info, test_dataset)
    # Named like the keys of final_metrics.json: test/error, noise/mmc, adv_noise/mmc, ...
    write_scalars(writer, step, scalars)
    with writer.as_default(step=step):
      for name, batch in images.items():
        tf.summary.image(f'{name}/images', batch, max_outputs=config.num_summary_images)
    logging.info('Eval at step %d: %s', step, ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()))
    return scalars

  logging.info(
    'Training %s %s on %s: steps %d -> %d (%d per epoch).',
    config.method,
    config.model,
    config.dataset,
    start_step,
    total_steps,
    steps_per_epoch,
  )
  step, train_metrics = start_step, {}
  window = dict.fromkeys(train_step.METRIC_SUMS + ('steps',), 0.0)
  t_start, t_window = time.time(), time.time()
  with distribution.preemption(strategy, checkpoints) as preemption:
    # The preemption check is the last hook: saves and exits (code 143) if a SIGTERM came, all
    # workers of a cluster at the same step.
    all_hooks = (*hooks, lambda step, _: preemption.after_call(step))
    while step < total_steps:
      boundaries = [total_steps, step + config.steps_per_call]
      for every in (config.log_every_steps, config.checkpoint_every_steps, config.eval.every_steps):
        boundaries.append((step // every + 1) * every)
      num = min(boundaries) - step
      sums, bad_step = train_steps(iterator, tf.constant(num))
      if int(bad_step) >= 0:
        raise FloatingPointError(
          f'Non-finite loss or gradient at step {int(bad_step)}; stopped without saving. The '
          f'last good checkpoint is {checkpoints.latest or "none (no checkpoint yet)"}. Lower '
          'the learning rate or check the data.'
        )
      step += num
      for k, v in sums.items():
        window[k] += float(v)
      window['steps'] += num
      if step % config.log_every_steps == 0 or step == total_steps:
        train_metrics = log_train_window(
          writer,
          window,
          step,
          start_step,
          total_steps,
          steps_per_epoch,
          optimizer,
          time.time() - t_window,
          time.time() - t_start,
        )
        window = dict.fromkeys(window, 0.0)
        t_window = time.time()
      context = HookContext(model, optimizer, workdir, total_steps, train_metrics)
      for hook in all_hooks:
        hook(step, context)
      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        checkpoints.save(step)
      if chief and step % config.eval.every_steps == 0 and step < total_steps:
        run_eval(step)

  final = {'step': step}
  if chief:
    final.update(run_eval(step))
  final.update(train_metrics)
  final['wall_time_s'] = time.time() - t_start
  if chief:
    runs.write_json(os.path.join(workdir, runs.FINAL_METRICS), final)
  logging.info('Final metrics: %s', json.dumps(final, sort_keys=True))
  return final
