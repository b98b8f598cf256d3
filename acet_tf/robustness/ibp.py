"""Interval bound propagation (IBP): a certified upper bound on the confidence in an L-inf ball.

For every input u with ||u - x||_inf <= eps and u in [0, 1], IBP bounds every unit of the network
from below and above, layer by layer, in inference mode (batch norm as the affine map of its moving
statistics). Affine layers (convolution, dense, batch norm) map centre c and radius r of an interval
to W c + b and |W| r; ReLU, max-pooling, average pooling, flatten, zero padding and addition are
monotone (or positive linear), so they map the lower and upper ends directly. The last dense layer
is bounded as GOOD (Bitterwolf et al., NeurIPS 2020) does: on the logit differences
z_k - z_j = (w_k - w_j) . h + b_k - b_j with h in the interval of its input, which is tighter than
subtracting logit intervals. Then max_k softmax_k = max_k 1 / sum_j exp(z_j - z_k)
<= max_k 1 / sum_j exp(-U_kj) for U_kj >= z_k - z_j.

Works on the functional Keras models of acet_tf.models (and any functional model built from the
layers above); anything else raises ValueError naming the layer. The bound is sound up to float32
round-off (about 1e-6 relative), which the soundness test allows for.

The interval travels through the model's own graph as one tensor [2B, ...]: lower ends stacked on
upper ends, so monotone layers run unchanged on it.
"""

import keras
import tensorflow as tf

_MONOTONE = (
  'MaxPooling2D',
  'AveragePooling2D',
  'GlobalAveragePooling2D',
  'Flatten',
  'Add',
  'InputLayer',
  'Reshape',
)


def _split(stacked):
  lo, hi = tf.split(stacked, 2, axis=0)
  return lo, hi


def _affine(stacked, linear, abs_linear, bias):
  lo, hi = _split(stacked)
  c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
  c = linear(c) + (bias if bias is not None else 0.0)
  r = abs_linear(r)
  return tf.concat([c - r, c + r], axis=0)


def _activation(layer, stacked):
  act = getattr(layer, 'activation', None)
  if act is None or act is keras.activations.linear:
    return stacked
  if act is keras.activations.relu:
    return tf.nn.relu(stacked)
  raise ValueError(f'IBP: layer {layer.name} has activation {act}, only ReLU or linear.')


def _conv(layer, stacked):
  if layer.data_format != 'channels_last' or layer.groups != 1:
    raise ValueError(f'IBP: conv {layer.name} must be channels_last with groups=1.')
  kernel = tf.cast(layer.kernel, tf.float32)
  kwargs = dict(strides=layer.strides, padding=layer.padding.upper(), dilations=layer.dilation_rate)
  out = _affine(
    stacked,
    lambda c: tf.nn.conv2d(c, kernel, **kwargs),
    lambda r: tf.nn.conv2d(r, tf.abs(kernel), **kwargs),
    tf.cast(layer.bias, tf.float32) if layer.use_bias else None,
  )
  return _activation(layer, out)


def _dense(layer, stacked):
  kernel = tf.cast(layer.kernel, tf.float32)
  out = _affine(
    stacked,
    lambda c: tf.tensordot(c, kernel, 1),
    lambda r: tf.tensordot(r, tf.abs(kernel), 1),
    tf.cast(layer.bias, tf.float32) if layer.use_bias else None,
  )
  return _activation(layer, out)


def _batch_norm(layer, stacked):
  axis = layer.axis if isinstance(layer.axis, int) else list(layer.axis)
  if axis not in (-1, len(stacked.shape) - 1, [-1], [len(stacked.shape) - 1]):
    raise ValueError(f'IBP: batch norm {layer.name} must normalise the last axis, got {axis}.')
  scale = tf.math.rsqrt(tf.cast(layer.moving_variance, tf.float32) + layer.epsilon)
  if layer.gamma is not None:
    scale *= tf.cast(layer.gamma, tf.float32)
  shift = -tf.cast(layer.moving_mean, tf.float32) * scale
  if layer.beta is not None:
    shift += tf.cast(layer.beta, tf.float32)
  return _affine(stacked, lambda c: c * scale, lambda r: r * tf.abs(scale), shift)


def _relu(layer, stacked):
  if (
    (layer.max_value is not None)
    or float(layer.negative_slope) != 0.0
    or float(layer.threshold) != 0.0
  ):
    raise ValueError(f'IBP: ReLU {layer.name} must be the plain max(x, 0).')
  return tf.nn.relu(stacked)


def _pad(op, *args, **kwargs):
  # Zero padding is linear with non-negative weights: pad both ends alike.
  if getattr(op, 'mode', 'constant') != 'constant' or getattr(op, 'constant_values', 0) not in (
    0,
    0.0,
    None,
  ):
    raise ValueError(f'IBP: {op.name} pads with a non-zero constant or another mode.')
  return op(*args, **kwargs)


def _interval_op(op):
  """The interval version of one operation of a functional model."""
  kind = type(op).__name__
  if kind == 'Conv2D':
    return lambda x, **kw: _conv(op, x)
  if kind == 'Dense':
    return lambda x, **kw: _dense(op, x)
  if kind == 'BatchNormalization':
    return lambda x, **kw: _batch_norm(op, x)
  if kind == 'ReLU':
    return lambda x, **kw: _relu(op, x)
  if kind == 'Activation':
    return lambda x, **kw: _activation(op, x)
  if kind == 'Pad':
    return lambda *a, **kw: _pad(op, *a, **kw)
  if kind in _MONOTONE:
    return lambda *a, **kw: op(*a, **kw)
  raise ValueError(
    f'IBP does not support {kind} ({op.name}); supported: Conv2D, Dense, '
    f'BatchNormalization, ReLU, Activation(relu), Pad, {", ".join(_MONOTONE)}.'
  )


def _final_dense(model):
  """The Dense op producing the logits, or None if the output comes from something else."""
  if len(model.outputs) != 1:
    raise ValueError(f'IBP needs a model with one output, {model.name} has {len(model.outputs)}.')
  op = model.outputs[0]._keras_history.operation
  if type(op).__name__ == 'Dense' and op.activation is keras.activations.linear:
    return op
  return None


def _propagate(model, lo, hi, stop_before=None):
  """(lower, upper) of the model's output, or of the input of `stop_before` (an operation)."""

  def operation_fn(op):
    if op is stop_before:
      return lambda x, **kw: x
    return _interval_op(op)

  stacked = tf.concat([tf.cast(lo, tf.float32), tf.cast(hi, tf.float32)], axis=0)
  return _split(model._run_through_graph(stacked, operation_fn=operation_fn))


def input_box(x, eps):
  """(lower, upper) of the L-inf ball of radius eps around x intersected with [0, 1]."""
  x = tf.convert_to_tensor(x, tf.float32)
  return tf.clip_by_value(x - eps, 0.0, 1.0), tf.clip_by_value(x + eps, 0.0, 1.0)


def logit_bounds(model, lo, hi):
  """Interval of the logits float32 ([B, K], [B, K]) for inputs in the box [lo, hi]."""
  return _propagate(model, lo, hi)


def logit_difference_upper(model, lo, hi):
  """float32 [B, K, K]: U[b, k, j] >= z_k(u) - z_j(u) for every u in [lo, hi]; U[b, k, k] = 0."""
  final = _final_dense(model)
  if final is None:
    z_lo, z_hi = _propagate(model, lo, hi)
    upper = z_hi[:, :, None] - z_lo[:, None, :]
  else:
    h_lo, h_hi = _propagate(model, lo, hi, stop_before=final)
    h_lo = tf.reshape(h_lo, [tf.shape(h_lo)[0], -1])
    h_hi = tf.reshape(h_hi, [tf.shape(h_hi)[0], -1])
    c, r = (h_lo + h_hi) / 2.0, (h_hi - h_lo) / 2.0
    w = tf.cast(final.kernel, tf.float32)  # [D, K]
    z = c @ w + (tf.cast(final.bias, tf.float32) if final.use_bias else 0.0)
    k = w.shape[1]
    abs_diff = tf.reshape(tf.abs(w[:, :, None] - w[:, None, :]), [w.shape[0], k * k])
    upper = z[:, :, None] - z[:, None, :] + tf.reshape(r @ abs_diff, [-1, k, k])
  k = upper.shape[-1]
  return upper * (1.0 - tf.eye(k))  # z_k - z_k = 0 exactly.


def confidence_upper_bound(model, x, eps):
  """float32 [B] >= max_k softmax_k(model(u)) for every u in the eps-ball around x within [0, 1].

  Args:
    model: a functional Keras model returning logits (acet_tf.models), called in inference mode.
    x: float32 [B, H, W, C] in [0, 1].
    eps: float >= 0; at 0 the bound is the model's confidence at x (up to float round-off).
  """
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  upper = logit_difference_upper(model, *input_box(x, eps))
  # 1 / sum_j exp(-U_kj) = exp(-logsumexp_j(-U_kj)); the best k for the attacker is the max.
  return tf.exp(tf.reduce_max(-tf.reduce_logsumexp(-upper, axis=2), axis=1))


def make_bound_fn(model, eps):
  """A compiled images [B, ...] -> confidence_upper_bound(model, images, eps)."""
  _final_dense(model)  # Fails early on a model IBP cannot bound.
  return tf.function(lambda x: confidence_upper_bound(model, x, eps), reduce_retracing=True)
