"""What an export is calibrated on and how often it accepts: the sets, the rates, a demo request.

measure_sets runs the trainer's own evaluation (evaluation/training_sets.py) on the first test
points, the noise and the adversarial noise; the threshold rule (CALIBRATION_RULE) and the accept
rates in the export's metadata are computed from them.
"""

import numpy as np

from acet_tf.data import input_pipeline
from acet_tf.evaluation import training_sets

CALIBRATION_RULE = (
  'auto: the largest threshold t such that at least {keep:.0%} of the correctly classified '
  'in-distribution test points have confidence >= t (ood_metrics.calibrate_threshold, '
  'keep={keep}), computed on the first {n} points of the {dataset} test split. The accept '
  'rates below are measured on those same points, so the test rate is in-sample.'
)


def _images(batches):
  """[(images, labels)] -> the images, float32 [N, H, W, C] numpy."""
  return np.concatenate([np.asarray(x) for x, _ in batches])


def measure_sets(model, config, info, num_examples, adv_noise_examples, test_batches=None):
  """The test set, noise and adversarial noise, with the model's predictions on them.

  The evaluator's units test, noise and adv_noise (training_sets.evaluate_training_sets, as the
  trainer's periodic evaluation: the same seeds, noise config and eval.adv_noise_* attack) on the
  first `num_examples` test points. Without the data (`info.has_data` False) there is no 'test'
  entry and the noise is uniform noise only (num_examples images, at most the recorded test size;
  the permuted half needs test images).

  Returns:
    {'test', 'noise', 'adv_noise'} -> (images float32 [n, H, W, C] in [0, 1],
    predictions.Predictions); 'adv_noise' is absent when adv_noise_examples == 0.
  """
  if num_examples < 1:
    raise ValueError(f'num_examples must be >= 1, got {num_examples}.')
  if adv_noise_examples < 0:
    raise ValueError(f'adv_noise_examples must be >= 0, got {adv_noise_examples}.')
  test = test_batches
  if test is None and info.has_data:
    test = input_pipeline.eval_dataset(
      config.dataset,
      'test',
      config.eval.batch_size,
      data_dir=config.data_dir or None,
      max_examples=num_examples,
      options=input_pipeline.options_from_config(config),
    )
  ctx = training_sets.evaluate_training_sets(
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
