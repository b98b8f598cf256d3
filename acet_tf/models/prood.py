"""ProoD (Meinke, Bitterwolf, Hein, NeurIPS 2022): a classifier and a binary in-vs-out
discriminator combined as p(y|x) = p(in|x) p(y|x, in) + (1 - p(in|x)) / K.

The discriminator is a small ReLU CNN whose last layer (NegativeDense) has strictly negative
weights W = -exp(V) on its non-negative (post-ReLU) features h(x), as the authors' LinearI_Neg:
its in-logit g(x) = W . h(x) + b <= b everywhere. Along a ray alpha * x the ReLU features are
eventually affine, h(alpha x) = alpha a + c with a >= 0, so g(alpha x) -> -inf unless a = 0 (every
feature eventually constant on the ray): p(in | alpha x) -> 0 and the confidence of the mixture
-> 1/K. That removes the paper's Theorem 3.1 (far from the data a ReLU classifier is almost surely
overconfident) by construction.

ProodModel's output is log p(y|x) of the mixture [B, K] up to a per-row constant (mixture_logits),
so everything that treats a model's output as logits (softmax, argmax, attacks, evaluation,
export) sees the mixture; its argmax is the classifier's (p(y|x) is increasing in p(y|x, in)
whenever p(in|x) > 0). The certificate over a
ball needs an upper bound u of p(in|x) there: max_y p(y|x) <= u + (1 - u) / K (since
p(y|x, in) <= 1), confidence_bound; robustness/ibp.py gets u from the discriminator's interval.
"""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package='acet_tf')
class NegativeDense(keras.layers.Layer):
  """Dense to `units` outputs with weights -exp(V) < 0 (V trained) and a free bias.

  `kernel` is the effective (negative) weight matrix, so the IBP walker bounds it as any Dense.
  """

  # losses.decayed_variables skips it: decaying V would pull the weights towards -1, not 0.
  weight_decay_exempt = True

  def __init__(self, units=1, **kwargs):
    super().__init__(**kwargs)
    self.units = int(units)
    self.use_bias = True
    self.activation = keras.activations.linear

  def build(self, input_shape):
    n = int(input_shape[-1])
    # W = -exp(V) with V ~ N(-log n, 0.5): |W| about 1/n, so g starts near b - mean(h), not -sum(h).
    init = keras.initializers.RandomNormal(mean=-math.log(n), stddev=0.5)
    self.log_weight = self.add_weight(name='log_weight', shape=(n, self.units), initializer=init)
    self.bias = self.add_weight(name='bias', shape=(self.units,), initializer='zeros')

  @property
  def kernel(self):
    return -tf.exp(tf.convert_to_tensor(self.log_weight))

  def call(self, x):
    return tf.matmul(x, tf.cast(self.kernel, x.dtype)) + tf.cast(self.bias, x.dtype)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.units,)

  def get_config(self):
    return dict(super().get_config(), units=self.units)


def discriminator(input_shape, filters=(16, 32), dense=100, name='discriminator'):
  """The in-vs-out discriminator: images float32 [B, H, W, C] in [0, 1] -> in-logit [B, 1].

  Args:
    input_shape: (H, W, C).
    filters: channels of the 4x4 stride-2 ReLU convolutions (IBP's small CNN: (16, 32)).
    dense: units of the ReLU dense layer before the last one (>= 1).
    name: the model's name.

  p(in|x) = sigmoid(in-logit). Only ReLU convolutions, dense layers and NegativeDense: IBP
  (robustness/ibp.py) bounds it, and the last layer keeps the in-logit <= its bias.
  """
  inputs = keras.Input(shape=tuple(input_shape), name='images')
  x = inputs
  for i, f in enumerate(filters):
    x = keras.layers.Conv2D(
      int(f), 4, strides=2, padding='same', activation='relu', name=f'disc_conv{i + 1}'
    )(x)
  x = keras.layers.Flatten(name='disc_flatten')(x)
  x = keras.layers.Dense(int(dense), activation='relu', name='disc_fc')(x)
  logit = NegativeDense(1, name='disc_in_logit', dtype='float32')(x)
  return keras.Model(inputs, logit, name=name)


def with_discriminator(classifier, input_shape, filters=(16, 32), dense=100):
  """A ProodModel of `classifier` and a fresh discriminator of images `input_shape`."""
  return ProodModel(classifier, discriminator(tuple(input_shape), tuple(filters), int(dense)))


def mixture_log_probs(logits, in_logit):
  """log p(y|x) float32 [B, K] of the ProoD mixture.

  Args:
    logits: the classifier's logits float32 [B, K] (p(y|x, in) = softmax).
    in_logit: the discriminator's in-logit float32 [B] (p(in|x) = sigmoid).

  log(p_in s_y + (1 - p_in) / K) from log-sigmoids and log-softmax, stable for any in_logit.
  """
  logits = tf.cast(logits, tf.float32)
  k = logits.shape[-1]
  g = tf.cast(in_logit, tf.float32)[:, None]
  a = tf.math.log_sigmoid(g) + tf.nn.log_softmax(logits)
  b = tf.math.log_sigmoid(-g) - math.log(k)
  hi = tf.maximum(a, b)
  return hi + tf.math.log1p(tf.exp(-tf.abs(a - b)))


def mixture_logits(logits, in_logit):
  """Logits float32 [B, K] of the ProoD mixture: log p(y|x) - log((1 - p(in|x)) / K), i.e.
  softplus(g + log K + log_softmax(logits)_y) with g the in-logit.

  A per-row constant away from mixture_log_probs, so softmax of it is p(y|x) exactly; but where
  p(in|x) is tiny (far from the data) log p(y|x) rounds to log(1/K) for every y in float32 and
  the classes tie, while softplus keeps them apart (increasing in p(y|x, in)) until exp(g) itself
  underflows (g + log p(y|x, in) < about -100): the argmax stays the classifier's.
  """
  logits = tf.cast(logits, tf.float32)
  k = logits.shape[-1]
  g = tf.cast(in_logit, tf.float32)[:, None]
  return tf.math.softplus(g + math.log(k) + tf.nn.log_softmax(logits))


def confidence_bound(in_logit_upper, num_classes):
  """float32 [B]: u + (1 - u) / K with u = sigmoid(in_logit_upper), the bound on max_y p(y|x)
  when in_logit_upper bounds the in-logit (before float32 round-off; ibp.py widens it)."""
  u = tf.sigmoid(tf.cast(in_logit_upper, tf.float32))
  return u + (1.0 - u) / float(num_classes)


@keras.saving.register_keras_serializable(package='acet_tf')
class ProodModel(keras.Model):
  """images float32 [B, H, W, C] in [0, 1] -> logits float32 [B, K] of the ProoD mixture
  (mixture_logits: softmax gives p(y|x); log p(y|x) plus a per-row constant).

  `classifier` (images -> logits [B, K]) and `discriminator` (images -> in-logit [B, 1]) are
  sub-models; checkpoints and exports hold both. Freeze the classifier with
  `model.classifier.trainable = False` before building an optimizer.
  """

  def __init__(self, classifier, discriminator, **kwargs):
    kwargs.setdefault('name', 'prood')
    super().__init__(**kwargs)
    self.classifier = classifier
    self.discriminator = discriminator
    self.num_classes = int(classifier.output_shape[-1])
    self._image_shape = tuple(classifier.input_shape[1:])
    self.build((None,) + self._image_shape)

  @property
  def input_shape(self):
    return (None,) + self._image_shape

  @property
  def output_shape(self):  # As a functional classifier's (acet_tf.keras.evaluate reads K here).
    return (None, self.num_classes)

  def build(self, input_shape):
    self.built = True

  def in_logit(self, images, training=False):
    """The discriminator's in-logit float32 [B]; p(in|x) = sigmoid."""
    return tf.cast(self.discriminator(images, training=training), tf.float32)[:, 0]

  def call(self, images, training=False):
    logits = self.classifier(images, training=training)
    return mixture_logits(logits, self.in_logit(images, training=training))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:1]) + (self.num_classes,)

  def get_config(self):
    return dict(
      name=self.name,
      classifier=keras.saving.serialize_keras_object(self.classifier),
      discriminator=keras.saving.serialize_keras_object(self.discriminator),
      # Keras restores a frozen model's layers as frozen but not the model's own flag, which
      # tells ProoD's frozen case (train_step.step_loss: no classifier loss).
      classifier_trainable=self.classifier.trainable,
    )

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    classifier = keras.saving.deserialize_keras_object(config.pop('classifier'))
    if not config.pop('classifier_trainable', True):
      classifier.trainable = False
    disc = keras.saving.deserialize_keras_object(config.pop('discriminator'))
    return cls(classifier, disc, **config)
