"""A training run's own evaluation on the evaluator units: the trainer's periodic one and the
export's calibration and accept rates (exporting/calibration.py).

  evaluate_training_sets    the units test, noise and adv_noise of a Keras model with a training
                            config's settings (settings_lib.settings_from_training_config);
  evaluate_during_training  the trainer's periodic scalars and images from evaluate_training_sets.
"""

import numpy as np

from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import settings as settings_lib
from acet_tf.evaluation import units


def evaluate_training_sets(model, config, info, test_batches, **overrides):
  """The units test, noise and adv_noise of a Keras model with its training config's settings.

  Args:
    model: a Keras model, images float32 [B, H, W, C] in [0, 1] -> logits [B, K].
    config: the run's config (seed, noise, eval.*: settings_lib.settings_from_training_config).
    info: input_pipeline.DatasetInfo of the in-distribution set.
    test_batches: (images, labels) batches of its test set; None: the data is not here (no test
      entry, the noise is uniform noise only).
    **overrides: Settings fields that win over the config (e.g. max_examples, sets=('noise',)).

  Returns:
    The units.Context after the units ran: results (results['test'],
    results['out_sets'][name]), predictions {name: evaluation.Predictions} and batches {name:
    [(images, labels)]} of 'test' (absent data-free), 'noise' and 'adv_noise' (if requested).
  """
  settings = settings_lib.settings_from_training_config(config, **overrides)
  predict_fn, logits_fn = saved_model_classifier.keras_model_fns(model)
  ctx = units.Context(
    predict_fn,
    logits_fn,
    settings,
    info,
    test_batches,
    config.noise,
    units.empty_results(),
  )
  return units.run(ctx)


def evaluate_during_training(model, config, info, test_dataset):
  """The periodic evaluation of the train loop (the full Table 1 is acet_tf.evaluate).

  Args:
    model: a Keras model returning logits.
    config: the run's config (reads seed, noise, eval.*).
    info: input_pipeline.DatasetInfo of the dataset.
    test_dataset: batches of (images, labels) of the in-distribution test set.

  Returns:
    (scalars, images): scalars {'test/error', 'test/mmc', 'noise/mmc', 'adv_noise/mmc'};
    images {'noise', 'adv_noise'}: float32 [n, H, W, C] for summaries.
  """
  ctx = evaluate_training_sets(model, config, info, test_dataset)
  test, out = ctx.results['test'], ctx.results['out_sets']
  scalars = {
    'test/error': test['error'],
    'test/mmc': test['mmc'],
    'noise/mmc': out['noise']['mmc'],
    'adv_noise/mmc': out['adv_noise']['mmc'],
  }
  n = config.num_summary_images
  images = {key: np.asarray(ctx.batches[key][0][0][:n]) for key in ('noise', 'adv_noise')}
  return scalars, images
