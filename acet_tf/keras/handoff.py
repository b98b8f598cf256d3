"""A classifier trained with fit, handed to the rest of acet_tf: evaluate (Table 1 and 2 and the
evaluations beyond the paper, evaluation/evaluator.py) and export (the abstaining SavedModel that
acet_tf.serve and TensorFlow Serving serve, exporting/exporter.py).

Both take an OutlierAwareModel (its step config gives the noise and the seed) or any Keras
classifier of logits, and either an acet_tf dataset name (`dataset='mnist5k'`, a TFDS name,
'folder:PATH', ...) or your own test data (`test_data`).
"""

from collections.abc import Iterable
from collections.abc import Sequence
import dataclasses
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf.data import input_pipeline
from acet_tf.evaluation import evaluator
from acet_tf.evaluation import saved_model_classifier
from acet_tf.evaluation import settings as settings_lib
from acet_tf.exporting import exporter
from acet_tf.keras import outlier_aware_model
from acet_tf.ops import noise as noise_lib


def _parts(model):
  """(classifier, step config or None, description) of an OutlierAwareModel or a classifier."""
  if isinstance(model, outlier_aware_model.OutlierAwareModel):
    step = model.step_config
    return model.classifier, step, {'method': step.method, 'model': model.classifier.name}
  if not isinstance(model, keras.Model):
    raise TypeError(f'model must be a keras.Model, got {type(model).__name__}.')
  outlier_aware_model.check_classifier(model)
  return model, None, {'model': model.name}


def _step(model):
  optimizer = getattr(model, 'optimizer', None)
  return int(optimizer.iterations.numpy()) if optimizer is not None else 0


def test_batches(test_data, batch_size):
  """(images, labels) batches from a tf.data.Dataset of batches or a pair of arrays.

  Images float32 [N, H, W, C] in [0, 1], labels int [N] (checked like fit's batches).
  """
  if isinstance(test_data, tf.data.Dataset):
    return test_data
  if not (isinstance(test_data, Sequence) and len(test_data) == 2):
    raise ValueError(
      'test_data must be a tf.data.Dataset of (images, labels) batches or a pair (images, labels).'
    )
  images, labels = np.asarray(test_data[0]), np.asarray(test_data[1])
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(
      f'test_data images must be float32 [N, H, W, C] in [0, 1]; got {images.dtype} {images.shape}.'
    )
  if images.size and (images.min() < 0 or images.max() > 1):
    raise ValueError('test_data images must be in [0, 1] (pixel / 255).')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f'test_data labels must be integer class labels [N]; got {labels.dtype} {labels.shape}'
      + (' (one-hot: take the argmax).' if labels.ndim == 2 else '.')
    )
  return (
    tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels.astype(np.int32)))
    .batch(batch_size)
    .prefetch(1)
  )


def _info(classifier, name, class_names, num_test):
  """A DatasetInfo for your own data: the classifier's input shape and classes."""
  shape = tuple(int(d) for d in classifier.input_shape[1:])
  k = int(classifier.output_shape[-1])
  names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(k))
  if len(names) != k:
    raise ValueError(f'class_names has {len(names)} names but the classifier has {k} classes.')
  return input_pipeline.DatasetInfo(name, shape, k, 0, num_test, names)


def evaluate(
  model: keras.Model,
  settings: settings_lib.Settings | None = None,
  *,
  dataset: str | None = None,
  test_data: Any = None,
  out_sets: dict[str, Iterable[Any]] | None = None,
  class_names: Sequence[str] | None = None,
  output_dir: str | None = None,
) -> dict[str, Any]:
  """acet_tf's evaluation of a Keras classifier (the binary's results dict).

  Args:
    model: an OutlierAwareModel (noise and seed from its step config) or a classifier of logits.
    settings: settings_lib.Settings; None: the paper's protocol (Settings()); its seed None: the
      step config's seed (0 for a bare classifier).
    dataset: an acet_tf dataset name: its test split and its out-datasets, as
      `python -m acet_tf.evaluate --workdir` does.
    test_data: instead, your own test set: a tf.data.Dataset of (images, labels) batches or a
      pair of arrays; with `out_sets` {name: image batches} as out-datasets (default none: noise,
      adversarial noise, adversarial samples and Table 2 only).
    class_names: the names of your K classes (test_data only).
    output_dir: if given, results.json, table.md, plots and summaries go there (required with
      `dataset`).

  Returns:
    evaluator.evaluate_model's results dict ('test', 'out_sets', 'table2', ...).
  """
  if (dataset is None) == (test_data is None):
    raise ValueError('Give one of dataset= (an acet_tf dataset name) or test_data=.')
  classifier, step_config, description = _parts(model)
  settings = settings or settings_lib.Settings()
  if settings.seed is None:
    seed = int(step_config.seed) if step_config is not None else 0
    settings = dataclasses.replace(settings, seed=seed)
  noise_config = step_config.noise if step_config is not None else None
  if dataset is not None:
    if not output_dir:
      raise ValueError('output_dir= is required with dataset= (results.json, table.md, plots).')
    if out_sets is not None or class_names is not None:
      raise ValueError('out_sets= and class_names= go with test_data=; a dataset has its own.')
    return evaluator.evaluate_run(
      settings,
      model=classifier,
      dataset=dataset,
      output_dir=output_dir,
      noise_config=noise_config,
      description=description,
      step=_step(model),
    )
  batches = test_batches(test_data, settings.batch_size)
  info = _info(classifier, 'custom', class_names, 0)
  predict_fn, logits_fn = saved_model_classifier.keras_model_fns(classifier)
  return evaluator.evaluate_model(
    predict_fn,
    info,
    batches,
    settings,
    out_sets=out_sets,
    logits_fn=logits_fn,
    noise_config=noise_config,
    output_dir=output_dir,
    step=_step(model),
    description={'source': 'keras_model', **description},
    keras_model=classifier,
    true_logits=True,
  )


def export(
  model: keras.Model,
  export_dir: str,
  *,
  dataset: str | None = None,
  test_data: Any = None,
  class_names: Sequence[str] | None = None,
  threshold: str | float = 'auto',
  keep: float = 0.95,
  num_examples: int | None = None,
  adv_noise_examples: int | None = None,
  eval_batch_size: int | None = None,
  version: int | None = None,
  demo_request_path: str | None = None,
  demo_examples: int = 5,
) -> tuple[str, dict[str, Any]]:
  """Exports a Keras classifier as the abstaining SavedModel (exporter.export_classifier).

  Args:
    model: an OutlierAwareModel or a classifier of logits.
    export_dir: base directory of the versions (EXPORT_DIR/<version>/).
    dataset: an acet_tf dataset name whose test split calibrates the threshold, or
    test_data: your own test set (a tf.data.Dataset of (images, labels) batches or a pair of
      arrays), with class_names for its K classes (default '0', '1', ...).
    threshold, keep, version, demo_request_path, demo_examples: as exporter.export_model.
    num_examples: test points for the calibration and the accept rates; None: the whole test set.
    adv_noise_examples: adversarial noise images for the accept rate; None: as many as
      num_examples; 0 skips it. The attack is the evaluation's (settings_lib.Settings' adv_noise_*:
      the paper's 200 steps of 0.0075 in eps 0.3).
    eval_batch_size: images per call; None: settings_lib.Settings' batch_size.

  Returns:
    (path of the version directory, the metadata dict written as its asset).
  """
  if (dataset is None) == (test_data is None):
    raise ValueError('Give one of dataset= (an acet_tf dataset name) or test_data=.')
  classifier, step_config, _ = _parts(model)
  protocol = settings_lib.Settings()  # The paper's evaluation protocol.
  batch_size = eval_batch_size or protocol.batch_size
  if dataset is not None:
    if class_names is not None:
      raise ValueError('class_names= goes with test_data=; a dataset has its own.')
    info = input_pipeline.get_info(dataset)
    shape = tuple(classifier.input_shape[1:])
    if shape != tuple(info.image_shape):
      raise ValueError(
        f'The classifier takes images of shape {shape}, but {dataset} has {info.image_shape}.'
      )
    batches, num_test = None, info.num_test_examples
  else:
    batches = test_batches(test_data, batch_size)
    num_test = sum(int(tf.shape(y)[0]) for _, y in batches)
    info = _info(classifier, 'custom', class_names, num_test)
  num_examples = num_test if num_examples is None else num_examples
  config = ml_collections.ConfigDict(
    dict(
      dataset=info.name,
      data_dir='',
      method=step_config.method if step_config is not None else 'unknown',
      model=classifier.name,
      seed=int(step_config.seed) if step_config is not None else 0,
      noise=(step_config.noise if step_config is not None else noise_lib.paper_noise_config()),
      eval=dict(
        batch_size=batch_size,
        max_examples=num_examples,
        adv_noise_steps=protocol.adv_noise_steps,
        adv_noise_eps=protocol.adv_noise_eps,
        adv_noise_step_size=protocol.adv_noise_step_size,
        adv_noise_examples=num_examples if adv_noise_examples is None else adv_noise_examples,
      ),
      source='acet_tf.keras',
      **({'step_config': step_config.to_dict()} if step_config is not None else {}),
    )
  )
  return exporter.export_classifier(
    classifier,
    config,
    info,
    export_dir,
    step=_step(model),
    test_batches=batches,
    version=version,
    threshold=threshold,
    keep=keep,
    num_examples=num_examples,
    adv_noise_examples=config.eval.adv_noise_examples,
    demo_request_path=demo_request_path,
    demo_examples=demo_examples,
  )
