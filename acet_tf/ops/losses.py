"""Per-example losses of the paper and the weight decay (docs/recipe.md "Losses").

Everything here is per example (no reduction): the train step reduces over the global batch, so
the update is the same on one or many replicas.
"""

import keras
import tensorflow as tf


def cross_entropy(logits, labels):
  """Softmax cross-entropy. logits: [B, K]; labels: int [B]. Returns float32 [B]."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
    labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)
  )


def max_log_confidence(logits):
  """Eq. (3): max_k log softmax(logits)_k, in [-log K, 0]. logits: [B, K]. Returns float32 [B].

  Minimising it on noise pushes the prediction towards the uniform distribution.
  """
  return tf.reduce_max(tf.nn.log_softmax(tf.cast(logits, tf.float32)), axis=-1)


def uniform_cross_entropy(logits):
  """Outlier Exposure's out-loss: cross-entropy from the uniform distribution to softmax(logits),
  -1/K sum_k log softmax_k = logsumexp(z) - mean(z), >= log K. logits: [B, K]; float32 [B]."""
  z = tf.cast(logits, tf.float32)
  return tf.reduce_logsumexp(z, axis=-1) - tf.reduce_mean(z, axis=-1)


WEIGHT_DECAY_RULES = ('reference', 'kernels')


def decayed_variables(model, rule):
  """The trainable variables of `model` that weight decay takes (config.weight_decay_variables).

  Args:
    model: a Keras model.
    rule: 'reference': every trainable variable of the convolution and dense layers, kernels and
      biases, no batch-norm parameters. That is the reference's rule (regularizers.weight_decay
      takes the variables whose names contain 'weight', 'fc' or 'conv': its conv and fc scopes),
      which decays every LeNet bias and the ResNet's final dense bias; layers of sub-models count
      (a ProoD model's, a user's nested Keras models); layers with weight_decay_exempt (the ProoD
      discriminator's NegativeDense, weights -exp(V)) do not under either rule. 'kernels':
      kernels only (variables with ndim > 1).

  Returns:
    A list of variables, in the order of model.trainable_variables.
  """

  def layers_of(m):  # Sub-models' layers too (a ProoD model's classifier and discriminator).
    # A list, not a generator: AutoGraph converts this function inside the train step.
    return [
      x
      for layer in m.layers
      for x in (layers_of(layer) if isinstance(layer, keras.Model) else [layer])
    ]

  if rule not in WEIGHT_DECAY_RULES:
    raise ValueError(f'weight_decay_variables must be one of {WEIGHT_DECAY_RULES}, got {rule!r}.')
  layers = layers_of(model)
  # A layer says it is exempt (models.prood.NegativeDense), under either rule: ops does not
  # import models.
  exempt = {
    id(v)
    for layer in layers
    if getattr(layer, 'weight_decay_exempt', False)
    for v in layer.trainable_weights
  }
  if rule == 'kernels':
    return [v for v in model.trainable_variables if len(v.shape) > 1 and id(v) not in exempt]
  weighted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
  chosen = {
    id(v) for layer in layers if isinstance(layer, weighted) for v in layer.trainable_weights
  }
  return [v for v in model.trainable_variables if id(v) in chosen and id(v) not in exempt]


def weight_decay(variables, coefficient):
  """coefficient * sum of squares over `variables` (pick them with decayed_variables)."""
  variables = [tf.cast(v, tf.float32) for v in variables]
  if not variables or coefficient == 0:
    return tf.constant(0.0)
  return coefficient * tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
