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
layers above); anything else raises ValueError naming the layer.

Float32 round-off is bounded outward, so the bounds need no tolerance at any eps (without it, eps
1e-6 on a 13-convolution net left float64 logits 3.8e-3 of the logit scale outside): every layer
that sums (convolution, dense, batch norm, addition, average pooling) widens its interval by
2 gamma_n (|W| |x| + |b|), gamma_n = n u / (1 - n u), u = 2^-24, n the number of terms plus a few,
and every end moves one float outward (nextafter). gamma_n |W| |x| bounds the error of a float32
sum of n products in any order (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1), so
one half covers this module's own arithmetic and the other the model's own float32 forward pass:
the intervals contain the exact-arithmetic network and every float32 evaluation whose kernels
sum products (direct or GEMM convolutions, as TensorFlow's CPU and GPU kernels; not a proof for
Winograd or FFT convolutions, whose error bounds are larger). The softmax bound is widened alike.

The interval travels through the model's own graph as one tensor [2B, ...]: lower ends stacked on
upper ends, so monotone layers run unchanged on it.

A ProoD model (models/prood.py) is bounded through its discriminator alone: u = sigmoid of the
upper end of the in-logit's interval bounds p(in|u) on the ball, and max_y p(y|u) <= u + (1 - u)/K
whatever the classifier does (prood_confidence_upper_bound). confidence_upper_bound and
make_bound_fn take either kind of model.
"""

import keras
import tensorflow as tf

from acet_tf.models import prood

# Positive-linear layers that sum (widened for round-off) and exact monotone ones.
_SUMMING = ('AveragePooling2D', 'GlobalAveragePooling2D', 'Add')
_MONOTONE = (
  'MaxPooling2D',
  'Flatten',
  'InputLayer',
  'Reshape',
  'ZeroPadding2D',  # Pads with zeros only (Keras has no other value for it).
)


def _split(stacked):
  lo, hi = tf.split(stacked, 2, axis=0)
  return lo, hi


_U = 2.0**-24  # Unit round-off of float32 (round to nearest).


def _gamma(n):
  """Twice Higham's gamma_n: the error of a sum of n terms, ours and the model's forward pass."""
  return 2.0 * n * _U / (1.0 - n * _U)


def _outward(lo, hi, slack_lo=0.0, slack_hi=0.0):
  """[lo - slack_lo, hi + slack_hi], each end then one float further out."""
  lo = tf.math.nextafter(lo - slack_lo, tf.constant(-float('inf'), lo.dtype))
  hi = tf.math.nextafter(hi + slack_hi, tf.constant(float('inf'), hi.dtype))
  return tf.concat([lo, hi], axis=0)


def _affine(stacked, linear, abs_linear, bias, terms, extra_magnitude=None):
  """W [lo, hi] + b as centre and radius, widened for round-off.

  terms: the number of products per output (the fan-in); extra_magnitude: further |.| the forward
  pass sums (batch norm's |mean * scale| + |beta|), else |b|.
  """
  lo, hi = _split(stacked)
  c = (lo + hi) / 2.0
  r = tf.maximum(hi - c, c - lo) * (1.0 + 4.0 * _U)  # Covers [lo, hi] despite rounding.
  out_c = linear(c) + (bias if bias is not None else 0.0)
  out_r = abs_linear(r)
  magnitude = abs_linear(tf.abs(c) + r)  # >= |W| |x| for every x in the interval.
  if extra_magnitude is not None:
    magnitude += extra_magnitude
  elif bias is not None:
    magnitude += tf.abs(bias)
  slack = _gamma(terms + 4) * magnitude
  return _outward(out_c - out_r, out_c + out_r, slack, slack)


def _summing(op, terms, *args, **kwargs):
  """A positive-linear summing op (Add, average pooling) on the stacked interval, widened."""
  out = op(*args, **kwargs)
  absolute = [tf.abs(t) for t in args[0]] if isinstance(args[0], (list, tuple)) else tf.abs(args[0])
  magnitude = op(absolute, *args[1:], **kwargs)  # >= |terms| summed, for the round-off bound.
  lo, hi = _split(out)
  m_lo, m_hi = _split(magnitude)
  slack = _gamma(terms + 2)
  return _outward(lo, hi, slack * m_lo, slack * m_hi)


def _summed_terms(op, args):
  kind = type(op).__name__
  if kind == 'Add':
    return len(args[0])
  if kind == 'AveragePooling2D':
    return int(op.pool_size[0] * op.pool_size[1])
  shape = args[0].shape  # GlobalAveragePooling2D: the whole spatial extent.
  return int(shape[1] * shape[2])


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
    terms=int(kernel.shape[0] * kernel.shape[1] * kernel.shape[2]),
  )
  return _activation(layer, out)


def _dense(layer, stacked):
  kernel = tf.cast(layer.kernel, tf.float32)
  out = _affine(
    stacked,
    lambda c: tf.tensordot(c, kernel, 1),
    lambda r: tf.tensordot(r, tf.abs(kernel), 1),
    tf.cast(layer.bias, tf.float32) if layer.use_bias else None,
    terms=int(kernel.shape[0]),
  )
  return _activation(layer, out)


def _batch_norm(layer, stacked):
  axis = layer.axis if isinstance(layer.axis, int) else list(layer.axis)
  if axis not in (-1, len(stacked.shape) - 1, [-1], [len(stacked.shape) - 1]):
    raise ValueError(f'IBP: batch norm {layer.name} must normalise the last axis, got {axis}.')
  scale = tf.math.rsqrt(tf.cast(layer.moving_variance, tf.float32) + layer.epsilon)
  if layer.gamma is not None:
    scale *= tf.cast(layer.gamma, tf.float32)
  mean = tf.cast(layer.moving_mean, tf.float32)
  shift = -mean * scale
  beta = tf.cast(layer.beta, tf.float32) if layer.beta is not None else 0.0
  shift += beta
  # The forward pass may compute (x - mean) * rsqrt(var + eps) * gamma + beta: a few roundings of
  # |x * scale|, |mean * scale| and |beta| (and of rsqrt itself), hence 8 terms.
  extra = tf.abs(mean * scale) + tf.abs(beta)
  return _affine(stacked, lambda c: c * scale, lambda r: r * tf.abs(scale), shift, 8, extra)


def _relu(layer, stacked):
  if (
    (layer.max_value is not None)
    or float(layer.negative_slope) != 0.0
    or float(layer.threshold) != 0.0
  ):
    raise ValueError(f'IBP: ReLU {layer.name} must be the plain max(x, 0).')
  return tf.nn.relu(stacked)


def _pad(op, x, *args, **kwargs):
  # Zero padding is linear with non-negative weights: pad both ends alike. keras.ops.pad records
  # constant_values as an argument of the call (the Pad operation has no such attribute).
  value = kwargs.get('constant_values', args[0] if args else None)
  if getattr(op, 'mode', 'constant') != 'constant' or value not in (0, 0.0, None):
    raise ValueError(
      f'IBP: {op.name} pads with mode {getattr(op, "mode", None)!r} and value {value!r}; only '
      'zeros are supported.'
    )
  return op(x, *args, **kwargs)


def _interval_op(op):
  """The interval version of one operation of a functional model."""
  kind = type(op).__name__
  if kind == 'Conv2D':
    return lambda x, **kw: _conv(op, x)
  if kind in ('Dense', 'NegativeDense'):  # NegativeDense: `kernel` is its weights -exp(V).
    return lambda x, **kw: _dense(op, x)
  if kind == 'BatchNormalization':
    return lambda x, **kw: _batch_norm(op, x)
  if kind == 'ReLU':
    return lambda x, **kw: _relu(op, x)
  if kind == 'Activation':
    return lambda x, **kw: _activation(op, x)
  if kind == 'Pad':
    return lambda *a, **kw: _pad(op, *a, **kw)
  if kind in _SUMMING:
    return lambda *a, **kw: _summing(op, _summed_terms(op, a), *a, **kw)
  if kind in _MONOTONE:
    return lambda *a, **kw: op(*a, **kw)
  raise ValueError(
    f'IBP does not support {kind} ({op.name}); supported: Conv2D, Dense, '
    f'BatchNormalization, ReLU, Activation(relu), Pad, {", ".join(_SUMMING + _MONOTONE)}.'
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
  """(lower, upper) of the L-inf ball of radius eps around x intersected with [0, 1].

  For eps > 0 each end moves one float outward, so the box contains the exact ball.
  """
  x = tf.convert_to_tensor(x, tf.float32)
  eps = tf.convert_to_tensor(eps, tf.float32)
  lo, hi = x - eps, x + eps
  # A tensor condition, not a Python `if`: eps is a tensor under GOOD's ramp, also in graphs that
  # AutoGraph does not convert (Keras' train_step).
  outward = eps > 0
  lo = tf.where(outward, tf.math.nextafter(lo, tf.constant(-float('inf'))), lo)
  hi = tf.where(outward, tf.math.nextafter(hi, tf.constant(float('inf'))), hi)
  return tf.clip_by_value(lo, 0.0, 1.0), tf.clip_by_value(hi, 0.0, 1.0)


def logit_bounds(model, lo, hi):
  """Interval of the logits float32 ([B, K], [B, K]) for inputs in the box [lo, hi]."""
  return _propagate(model, lo, hi)


def logit_difference_upper(model, lo, hi):
  """float32 [B, K, K]: U[b, k, j] >= z_k(u) - z_j(u) for every u in [lo, hi]; U[b, k, k] = 0."""
  final = _final_dense(model)
  if final is None:
    z_lo, z_hi = _propagate(model, lo, hi)
    upper = z_hi[:, :, None] - z_lo[:, None, :]
    upper += _gamma(2) * (tf.abs(z_hi[:, :, None]) + tf.abs(z_lo[:, None, :]))
  else:
    h_lo, h_hi = _propagate(model, lo, hi, stop_before=final)
    h_lo = tf.reshape(h_lo, [tf.shape(h_lo)[0], -1])
    h_hi = tf.reshape(h_hi, [tf.shape(h_hi)[0], -1])
    c, r = (h_lo + h_hi) / 2.0, (h_hi - h_lo) / 2.0
    w = tf.cast(final.kernel, tf.float32)  # [D, K]
    r = r * (1.0 + 4.0 * _U)
    b = tf.cast(final.bias, tf.float32) if final.use_bias else tf.zeros([w.shape[1]])
    z = c @ w + b
    k = w.shape[1]
    abs_diff = tf.reshape(tf.abs(w[:, :, None] - w[:, None, :]), [w.shape[0], k * k])
    spread = tf.reshape(r @ abs_diff, [-1, k, k])
    upper = z[:, :, None] - z[:, None, :] + spread
    # Round-off of both logits (ours and the forward pass's) and of the spread.
    magnitude = (tf.abs(c) + r) @ tf.abs(w) + tf.abs(b)  # [B, K]
    upper += _gamma(int(w.shape[0]) + 6) * (magnitude[:, :, None] + magnitude[:, None, :] + spread)
  k = upper.shape[-1]
  upper = tf.math.nextafter(upper, tf.constant(float('inf')))
  return upper * (1.0 - tf.eye(k))  # z_k - z_k = 0 exactly.


def confidence_upper_bound(model, x, eps):
  """float32 [B] >= max_k softmax_k(model(u)) for every u in the eps-ball around x within [0, 1].

  Args:
    model: a functional Keras model returning logits (acet_tf.models), called in inference mode,
      or a models.ProodModel (prood_confidence_upper_bound).
    x: float32 [B, H, W, C] in [0, 1].
    eps: float >= 0; at 0 the bound is the model's confidence at x, plus its round-off bound
      (about 1e-6 relative on the nets of the tests).
  """
  if eps < 0:
    raise ValueError(f'eps must be >= 0, got {eps}')
  if isinstance(model, prood.ProodModel):
    return prood_confidence_upper_bound(model, x, eps)
  bound = tf.exp(log_confidence_upper_bound(model, x, eps))
  return tf.math.nextafter(bound * (1.0 + 4.0 * _U), tf.constant(float('inf')))  # exp's round-off.


def log_confidence_upper_bound(model, x, eps):
  """float32 [B] >= max_k log softmax_k(model(u)) over the eps-ball around x within [0, 1].

  Differentiable in the model's weights (GOOD trains on it); eps may be a tensor (a ramp).
  """
  upper = logit_difference_upper(model, *input_box(x, eps))
  # 1 / sum_j exp(-U_kj) = exp(-logsumexp_j(-U_kj)); the best k for the attacker is the max.
  lse = tf.reduce_logsumexp(-upper, axis=2)  # [B, K], >= 0.
  # Round-off of the logsumexp here and of the forward pass's softmax: K + a few terms.
  lse -= _gamma(upper.shape[-1] + 8) * (1.0 + tf.abs(lse) + tf.reduce_max(tf.abs(upper), axis=2))
  return tf.reduce_max(-lse, axis=1)


def in_logit_upper_bound(discriminator, x, eps):
  """float32 [B] >= the in-logit discriminator(u)[:, 0] for every u in the eps-ball around x
  within [0, 1] (the discriminator of models/prood.py, or any one-output model IBP walks).

  Differentiable in the weights (ProoD trains on it); eps may be a tensor (a ramp).
  """
  _, hi = logit_bounds(discriminator, *input_box(x, eps))
  return hi[:, 0]


def prood_confidence_upper_bound(model, x, eps):
  """float32 [B] >= max_y p(y|u) of a models.ProodModel for every u in the eps-ball around x.

  u_in = sigmoid(in_logit_upper_bound) bounds p(in|u); p(y|u, in) <= 1 gives max_y p(y|u) <=
  u_in + (1 - u_in) / K (prood.confidence_bound), which is increasing in u_in. The slack covers
  the float32 round-off of sigmoid, of the bound's two terms and of the model's own mixture and
  softmax (a few ulps of each of K + a few terms of magnitude <= 1, so absolute).
  """
  g_hi = in_logit_upper_bound(model.discriminator, x, eps)
  k = model.num_classes
  bound = prood.confidence_bound(g_hi, k)
  bound = bound * (1.0 + _gamma(k + 16)) + _gamma(k + 16)
  return tf.minimum(tf.math.nextafter(bound, tf.constant(float('inf'))), 1.0)


def make_bound_fn(model, eps):
  """A compiled images [B, ...] -> confidence_upper_bound(model, images, eps)."""
  if isinstance(model, prood.ProodModel):
    # Fails early on a discriminator IBP cannot bound.
    _final_dense(model.discriminator)
    return tf.function(lambda x: prood_confidence_upper_bound(model, x, eps), reduce_retracing=True)
  _final_dense(model)  # Fails early on a model IBP cannot bound.
  return tf.function(lambda x: confidence_upper_bound(model, x, eps), reduce_retracing=True)
