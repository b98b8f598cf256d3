"""OutlierAwareModel: training of your own Keras classifier with model.fit, by any of the
trainer's methods (plain, CEDA, ACET, OE, GOOD, ProoD).

  model = acet_tf.keras.OutlierAwareModel(my_keras_classifier, method='acet')
  model.compile(optimizer='adam', metrics=['accuracy'])
  model.fit(my_dataset, epochs=12, callbacks=[keras.callbacks.TensorBoard('logs')])

train_step runs the trainer's own per-replica step (training/train_step.make_replica_step: the
noise or adversarial noise batch, the loss, the update); test_step runs its parts without the
update (train_step.out_batch, step_loss, step_sums), in inference mode and on its own seed
streams. The hyperparameters are a step config (train_step.step_config: the paper's recipe, or
any acet_tf training config such as configs/mnist5k.py's) with keyword overrides, logged in full
when the model is made and saved with it. For ProoD the model trained is a models.ProodModel:
your classifier plus an in-vs-out discriminator.
"""

from collections.abc import Mapping
from typing import Any

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf.models import prood
from acet_tf.training import train_step

METHODS = train_step.METHODS
# The step config's keys that the keyword overrides may set (nested ones take a dict of fields).
STEP_KEYS = (
  'seed',
  'noise',
  'pgd',
  'good',
  'prood',
  'weight_decay',
  'weight_decay_variables',
  'jit_compile',
)
MODEL_KEYS = ('name', 'trainable', 'dtype')  # keras.Model's own keyword arguments.


class RatioMetric(keras.metrics.Metric):
  """sum(totals) / sum(counts) over the batches (and replicas) seen: the trainer's window means."""

  def __init__(self, name, **kwargs):
    super().__init__(name=name, **kwargs)
    self.total = self.add_variable(shape=(), initializer='zeros', name='total', aggregation='sum')
    self.count = self.add_variable(shape=(), initializer='zeros', name='count', aggregation='sum')

  def update_state(self, total, count):
    self.total.assign_add(tf.cast(total, self.dtype))
    self.count.assign_add(tf.cast(count, self.dtype))

  def result(self):
    return self.total / tf.maximum(self.count, 1.0)


# ----------------------------------------------------------------------------------------------
# The step config.
# ----------------------------------------------------------------------------------------------


def make_step_config(method, config=None, **overrides):
  """The step config of the model: what train_step reads, checked.

  Args:
    method: one of METHODS, or None to take config.method.
    config: an ml_collections.ConfigDict holding at least train_step.step_config's keys (a full
      acet_tf training config works: configs/mnist5k.py's get_config('acet'), ...); None: the
      paper's recipe for `method` (train_step.step_config).
    **overrides: STEP_KEYS; `noise`, `pgd`, `good` and `prood` take a dict of their fields
      (pgd=dict(steps=10)).

  Returns:
    A new ConfigDict with exactly train_step.step_config's keys.
  """
  if method is None:
    if config is None:
      raise ValueError(f'Give method= (one of {METHODS}) or a config that names it.')
    method = config.method
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}: OutlierAwareModel trains one of {METHODS}.')
  if config is not None and config.get('method', method) != method:
    raise ValueError(
      f'method={method!r} but the config is for {config.method!r}: give one or make them agree.'
    )
  step = train_step.step_config(method)
  if config is not None:
    sources = tuple(config.get('out_data', {}).get('sources', (train_step.NOISE_SOURCE,)))
    if sources != (train_step.NOISE_SOURCE,):
      # Real outlier images need their banks, which the trainer loads; here they would be
      # silently replaced by the paper's noise.
      raise ValueError(
        f"config.out_data.sources is {sources}: OutlierAwareModel draws the paper's noise only; "
        'train on outlier images with python -m acet_tf.train.'
      )
    missing = [k for k in step if k not in config]
    if missing:
      raise ValueError(
        f'The config lacks {missing}: give a config like train_step.step_config or '
        'configs/common.py base_config.'
      )
    for key in step:
      step[key] = config[key]
    step = ml_collections.ConfigDict(step.to_dict())  # A copy: the caller's config stays as is.
  for key, value in overrides.items():
    if key not in STEP_KEYS:
      raise ValueError(f'Unknown hyperparameter {key!r}; OutlierAwareModel takes {STEP_KEYS}.')
    if key in ('good', 'prood') and key not in step:
      raise ValueError(f'{key}= sets the hyperparameters of method {key!r}, not of {method!r}.')
    if isinstance(step[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ValueError(f'{key}= takes a dict of fields of {sorted(step[key])}, got {value!r}.')
      unknown = sorted(set(value) - set(step[key]))
      if unknown:
        raise ValueError(f'Unknown {key} field(s) {unknown}; {key} has {sorted(step[key])}.')
      for field, v in value.items():
        step[key][field] = v
    else:
      step[key] = value
  train_step.validate_step_config(step)
  return step


# ----------------------------------------------------------------------------------------------
# Checks of the classifier and the data, with messages that name what is wrong.
# ----------------------------------------------------------------------------------------------


def _ends_in_softmax(classifier):
  layers = getattr(classifier, 'layers', None)
  if not layers:
    return False
  last = layers[-1]
  if isinstance(last, keras.layers.Softmax):
    return True
  activation = getattr(last, 'activation', None)
  return activation is keras.activations.softmax or getattr(activation, '__name__', '') == 'softmax'


def check_classifier(classifier):
  """Raises ValueError unless `classifier` maps images to logits [B, K], K >= 2.

  A classifier built on a known input shape is probed on 4 uniform images: outputs of another
  rank, or rows that are all non-negative and sum to 1 (probabilities, e.g. a final softmax), are
  refused. Returns (input shape (H, W, C) or None if not known yet, K or None).
  """
  if not isinstance(classifier, keras.Model):
    raise TypeError(f'classifier must be a keras.Model, got {type(classifier).__name__}.')
  if _ends_in_softmax(classifier):
    raise ValueError(
      f'The classifier {classifier.name!r} ends in a softmax; OutlierAwareModel needs logits '
      '[B, K]: remove the softmax (the losses apply it themselves).'
    )
  try:
    input_shape = tuple(classifier.input_shape)
  except (AttributeError, ValueError):
    return None, None
  if len(input_shape) != 4 or None in input_shape[1:]:
    raise ValueError(
      f'The classifier {classifier.name!r} takes inputs of shape {input_shape}; '
      'OutlierAwareModel trains image classifiers, images [B, H, W, C].'
    )
  probe = np.random.RandomState(0).rand(4, *input_shape[1:]).astype(np.float32)
  out = np.asarray(classifier(probe, training=False), np.float64)
  if out.ndim != 2 or out.shape[1] < 2:
    raise ValueError(
      f'The classifier {classifier.name!r} outputs shape {out.shape} on 4 images; '
      'OutlierAwareModel needs logits of shape [B, K], K >= 2 classes.'
    )
  if (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
    raise ValueError(
      f'The classifier {classifier.name!r} outputs probabilities (non-negative rows that sum '
      'to 1, as after a softmax); OutlierAwareModel needs logits [B, K]: remove the softmax.'
    )
  return input_shape[1:], out.shape[1]


def check_batch(x, y, num_classes):
  """(images float32 [B, H, W, C], labels int32 [B]) of a batch, or an error naming the problem.

  Static checks (rank, dtype, one-hot labels) raise ValueError when the step is traced; the
  value checks (images in [0, 1], labels in [0, K)) are in the graph and stop fit with an
  InvalidArgumentError whose message says which.
  """
  if y is None:
    raise ValueError('OutlierAwareModel trains on (images, labels) batches; got images only.')
  if isinstance(x, (dict, list, tuple)):
    raise ValueError('OutlierAwareModel takes one images tensor per batch, not a dict or a list.')
  images, labels = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
  if images.shape.rank != 4:
    raise ValueError(
      f'images must be float32 [B, H, W, C] in [0, 1]; got rank {images.shape.rank}, shape '
      f'{images.shape} (add a channel axis for grey images: images[..., None]).'
    )
  if not images.dtype.is_floating:
    raise ValueError(
      f'images must be float32 in [0, 1]; got {images.dtype.name} (for 0..255 pixels: '
      'tf.cast(images, tf.float32) / 255).'
    )
  images = tf.cast(images, tf.float32)
  if labels.shape.rank == 2 and labels.shape[-1] == 1:
    labels = labels[:, 0]
  if labels.shape.rank == 2:
    raise ValueError(
      f'labels have shape {labels.shape}: one-hot labels; OutlierAwareModel expects integer '
      'class labels of shape [B] (tf.argmax(labels, axis=-1)).'
    )
  if labels.shape.rank != 1:
    raise ValueError(f'labels must be integer class labels [B]; got shape {labels.shape}.')
  checks = [
    tf.debugging.assert_greater_equal(
      tf.reduce_min(images), 0.0, message='images must be in [0, 1]: found a value below 0'
    ),
    tf.debugging.assert_less_equal(
      tf.reduce_max(images), 1.0, message='images must be in [0, 1]: found a value above 1'
    ),
  ]
  if labels.dtype.is_floating:
    checks.append(
      tf.debugging.assert_equal(
        labels,
        tf.round(labels),
        message='labels must be integer class labels [B]; got non-integer floats',
      )
    )
  labels = tf.cast(labels, tf.int32)
  if num_classes is not None:
    checks.append(
      tf.debugging.assert_less(
        labels,
        num_classes,
        message=f'labels must be class indices in [0, {num_classes}); found one >= {num_classes}',
      )
    )
  checks.append(
    tf.debugging.assert_non_negative(labels, message='labels must be class indices >= 0')
  )
  with tf.control_dependencies(checks):
    return tf.identity(images), tf.identity(labels)


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package='acet_tf')
class OutlierAwareModel(keras.Model):
  """Wraps an image classifier (images float32 [B, H, W, C] in [0, 1] -> logits [B, K]) so
  that fit trains it with `method`: plain, CEDA (noise), ACET (adversarial noise), OE, GOOD or
  ProoD.

  Args:
    classifier: a keras.Model of logits (no final softmax), e.g. a keras.Sequential. For 'prood'
      it gets a fresh discriminator (models.prood.discriminator of config.prood's disc_filters and
      disc_dense) and the two train as a models.ProodModel; or pass a ProodModel itself. Freeze
      the classifier (classifier.trainable = False) to train the discriminator alone, as the
      trainer's config.classifier_workdir does.
    method: one of METHODS ('plain', 'ceda', 'acet', 'oe', 'good', 'prood'); None: config.method.
      On the paper's noise only (the trainer's config.out_data takes outlier images). 'prood'
      needs the float32 dtype policy (its bounds are proven in float32).
    config: the hyperparameters, an ml_collections.ConfigDict with train_step.step_config's keys
      (any acet_tf training config has them); None: the paper's recipe for `method`.
    total_steps: the length of the fit, for the ramps of GOOD and ProoD (train_step.good_ramp,
      prood_eps; required for 'good' and 'prood' unless their ramp_end is 0). validate/evaluate
      use the ramp's end values.
    **kwargs: STEP_KEYS overrides (seed=, noise=dict(...), pgd=dict(steps=..., step_size=...),
      good=dict(...), prood=dict(...), weight_decay=, weight_decay_variables=, jit_compile=),
      then keras.Model's (name=).

  fit takes (images, labels int [B]) batches. Metrics, as the trainer logs them without its
  `train/` prefix (Keras adds `val_` and TensorBoard's train/validation runs): loss, loss_in,
  error, mmc_in and, with noise, loss_out and mmc_out; plus compile's metrics on the clean batch.
  The trained classifier is `model.classifier` (acet_tf.keras.evaluate, acet_tf.keras.export);
  for 'prood' that is the ProodModel, whose outputs (the mixture's logits) are what the rest of
  acet_tf evaluates, bounds (ibp.prood_confidence_upper_bound) and exports.
  """

  def __init__(self, classifier, method=None, config=None, total_steps=None, **kwargs):
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in STEP_KEYS}
    unknown = sorted(set(kwargs) - set(MODEL_KEYS))
    if unknown:
      raise ValueError(
        f'Unknown hyperparameter {unknown[0]!r}; OutlierAwareModel takes {STEP_KEYS} and '
        f"keras.Model's {MODEL_KEYS}."
      )
    super().__init__(**kwargs)
    self.step_config = make_step_config(method, config, **overrides)
    self.method = self.step_config.method
    ramped = {'good': 'eps and weight', 'prood': 'eps'}.get(self.method)
    if ramped and self.step_config[self.method].ramp_end > 0 and total_steps is None:
      # The trainer knows its length; fit does not, and a ramp over a guessed length would
      # silently be another schedule.
      raise ValueError(
        f'method {self.method!r} ramps its {ramped} over the first {self.method}.ramp_end of '
        'training: give total_steps= (epochs x steps per epoch), or '
        f'{self.method}=dict(ramp_start=0, ramp_end=0) for no ramp.'
      )
    if total_steps is not None and int(total_steps) < 1:
      raise ValueError(f'total_steps must be >= 1, got {total_steps}.')
    self.total_steps = None if total_steps is None else int(total_steps)
    if self.method == 'prood':
      classifier = self._prood_model(classifier)
    elif isinstance(classifier, prood.ProodModel):
      raise ValueError(
        f'The classifier {classifier.name!r} is a ProodModel (classifier + discriminator): '
        "train it with method='prood'."
      )
    else:
      self.image_shape, self.num_classes = check_classifier(classifier)
    self.classifier = classifier
    logging.info(
      'OutlierAwareModel(%s, method=%s), step config: %s',
      classifier.name,
      self.method,
      self.step_config.to_json(sort_keys=True),
    )
    names = ['loss_in', 'error', 'mmc_in']
    if self.step_config.noise.ratio > 0:
      names += ['loss_out', 'mmc_out']
    # Keras' callbacks tell the direction of compile's metrics only: monitoring these (but
    # `loss`) takes mode='min' or 'max'.
    self.step_metrics = [RatioMetric(name) for name in names]
    # Draws of test_step's noise and PGD starts: one per evaluated batch.
    self.test_draws = self.add_weight(
      shape=(),
      dtype='int64',
      initializer='zeros',
      trainable=False,
      aggregation='only_first_replica',
      name='test_draws',
    )
    self._replica_step = None
    self._replica_step_optimizer = None
    if classifier.built:
      self.built = True  # Its variables are the classifier's: saved, restored, checkpointed.

  def _prood_model(self, classifier):
    """The ProodModel that method 'prood' trains: `classifier` if it is one, else `classifier`
    with a fresh discriminator of config.prood's shape (the trainer's models.create_prood_model)."""
    policy = keras.config.dtype_policy().name
    if policy != 'float32':
      # As the trainer (validate_config): the discriminator's bound is only a bound in the
      # float32 arithmetic it is proven in.
      raise ValueError(
        f"method 'prood' computes its IBP bounds in float32, but the global Keras dtype policy "
        f'is {policy!r}: train it without mixed precision (keras.config.set_dtype_policy('
        "'float32'))."
      )
    if isinstance(classifier, prood.ProodModel):
      self.image_shape, self.num_classes = check_classifier(classifier.classifier)
      return classifier
    self.image_shape, self.num_classes = check_classifier(classifier)
    if self.image_shape is None:
      raise ValueError(
        f"method 'prood' gives the classifier {classifier.name!r} a discriminator of its input "
        'shape, which is not known yet: build it on its input first (keras.Input((H, W, C))).'
      )
    p = self.step_config.prood
    return prood.with_discriminator(classifier, self.image_shape, p.disc_filters, p.disc_dense)

  def call(self, inputs, training=False):
    return self.classifier(inputs, training=training)

  def compile(self, optimizer='rmsprop', loss=None, **kwargs):
    """keras.Model.compile without a loss (the method's is used); jit_compile defaults to False:
    config.jit_compile compiles the step itself."""
    if loss is not None:
      raise ValueError(
        f'OutlierAwareModel trains with the loss of method {self.method!r} (cross-entropy on the '
        'clean images, max log-confidence on the noise); compile it without loss=.'
      )
    kwargs.setdefault('jit_compile', False)
    super().compile(optimizer=optimizer, **kwargs)

  def compile_from_config(self, config):
    """What keras.models.load_model calls: compile (and build the optimizer) as saved."""
    self.compile(**keras.saving.deserialize_keras_object(config))
    if self.built:
      self.optimizer.build(self.trainable_variables)

  def _step_fn(self):
    if self._replica_step is None or self._replica_step_optimizer is not self.optimizer:
      self._replica_step = train_step.make_replica_step(
        self.classifier, self.optimizer, self.step_config, total_steps=self.total_steps or 1
      )
      self._replica_step_optimizer = self.optimizer
    return self._replica_step

  def _batch(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if sample_weight is not None:
      raise ValueError('OutlierAwareModel takes no sample weights: every example counts once.')
    return check_batch(x, y, self.num_classes)

  def _update_metrics(self, sums, images, labels, logits_in):
    replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    # sums['loss'] is this replica's share of the global loss: summed over replicas it is the
    # trainer's per-step loss; one weight per step, as train/loss.
    self._loss_tracker.update_state(sums['loss'] * replicas, sample_weight=1.0 / replicas)
    totals = dict(
      loss_in=(sums['loss_in'], sums['count_in']),
      error=(sums['errors'], sums['count_in']),
      mmc_in=(sums['conf_in'], sums['count_in']),
      loss_out=(sums['loss_out'], sums['count_out']),
      mmc_out=(sums['conf_out'], sums['count_out']),
    )
    for metric in self.step_metrics:
      metric.update_state(*totals[metric.name])
    return self.compute_metrics(images, labels, logits_in)

  def train_step(self, data):
    images, labels = self._batch(data)
    sums, logits_in = self._step_fn()(images, labels)
    finite = tf.debugging.Assert(
      sums['nonfinite'] == 0.0,
      [
        'Non-finite loss or gradient at step (the weights are already updated; do not save them)',
        self.optimizer.iterations - 1,
      ],
    )
    with tf.control_dependencies([finite]):
      return self._update_metrics(sums, images, labels, logits_in)

  def test_step(self, data):
    images, labels = self._batch(data)
    config = self.step_config
    out = train_step.out_batch(
      self.classifier,
      config,
      images,
      self.test_draws,
      train_step.image_noise(config),
      streams=train_step.TEST_STREAMS,
    )
    loss, logits, loss_in, loss_out = train_step.step_loss(
      self.classifier, config, images, labels, out, training=False
    )
    sums = train_step.step_sums(loss, logits, labels, loss_in, loss_out)
    with tf.control_dependencies([self.test_draws.assign_add(1)]):
      return self._update_metrics(sums, images, labels, logits[: tf.shape(images)[0]])

  def get_config(self) -> dict[str, Any]:
    return {
      'name': self.name,
      'classifier': keras.saving.serialize_keras_object(self.classifier),
      'method': self.method,
      'config': self.step_config.to_dict(),
      'total_steps': self.total_steps,
    }

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    classifier = keras.saving.deserialize_keras_object(
      config.pop('classifier'), custom_objects=custom_objects
    )
    step = dict(config.pop('config'))
    if 'prood' in step:  # JSON made step_config's tuple a list.
      step['prood'] = dict(step['prood'], disc_filters=tuple(step['prood']['disc_filters']))
    step = ml_collections.ConfigDict(step)
    return cls(classifier, method=config.pop('method'), config=step, **config)
