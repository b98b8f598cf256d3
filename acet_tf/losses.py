"""Per-example losses of the paper and the weight decay (RECIPE.md "Losses").

Everything here is per example (no reduction): the train step reduces over the global batch, so
the update is the same on one or many replicas.
"""
import tensorflow as tf


def cross_entropy(logits, labels):
  """Softmax cross-entropy. logits: [B, K]; labels: int [B]. Returns float32 [B]."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def max_log_confidence(logits):
  """Eq. (3): max_k log softmax(logits)_k, in [-log K, 0]. logits: [B, K]. Returns float32 [B].

  Minimising it on noise pushes the prediction towards the uniform distribution.
  """
  return tf.reduce_max(tf.nn.log_softmax(tf.cast(logits, tf.float32)), axis=-1)


def weight_decay(variables, coefficient):
  """coefficient * sum of squared weights over the kernels (variables with ndim > 1).

  Biases and BatchNorm scales/offsets are left out, as in the reference's weight-only decay.
  """
  kernels = [tf.cast(v, tf.float32) for v in variables if len(v.shape) > 1]
  if not kernels or coefficient == 0:
    return tf.constant(0.0)
  return coefficient * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])
