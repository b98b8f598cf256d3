"""The ResNets for SVHN and CIFAR: the reference's small pre-activation ResNet and ResNet-18.

Both are ReLU networks with batch norm, average pooling and a dense head, so at inference
(batch norm
on its moving statistics) the logits are piecewise affine in the input. Every batch norm is
synchronized: under MirroredStrategy it normalises with the statistics of the global batch, so the
moving statistics stay equal on all replicas (a no-op on one device).
"""

import keras
import tensorflow as tf

# He initialisation, as the reference initialises its convolutions.
_INIT = 'he_normal'


def _bn(name):
  # epsilon as in the reference (tf.layers default 1e-3 was overridden to 1e-5); momentum 0.99 is
  # Keras' default and the reference's.
  return keras.layers.BatchNormalization(epsilon=1e-5, synchronized=True, name=name)


def _conv(filters, kernel_size, stride, name):
  # No bias: every convolution feeds a batch norm, whose offset plays that role.
  return keras.layers.Conv2D(
    filters,
    kernel_size,
    strides=stride,
    padding='same',
    use_bias=False,
    kernel_initializer=_INIT,
    name=name,
  )


def _logits(x, num_classes):
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  # Softmax and log-confidence losses want float32 logits even when the body runs in float16.
  head_dtype = 'float32' if keras.config.dtype_policy().name.startswith('mixed') else None
  return keras.layers.Dense(num_classes, kernel_initializer=_INIT, dtype=head_dtype, name='logits')(
    x
  )


# --------------------------------------------------------------------------------------------------
# The reference's "resnet_small" (pre-activation, He et al. 2016 "Identity mappings").
# --------------------------------------------------------------------------------------------------


def _preact_unit(x, filters, stride, activate_shortcut, shortcut, name):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut; x: [B, H, W, C] -> [B, H/s, W/s, F]."""
  in_filters = x.shape[-1]
  y = keras.layers.ReLU(name=f'{name}_relu1')(_bn(f'{name}_bn1')(x))
  # The first unit of a stage feeds the shortcut the pre-activated input, as the reference does.
  residual = y if activate_shortcut else x
  y = _conv(filters, 3, stride, f'{name}_conv1')(y)
  y = keras.layers.ReLU(name=f'{name}_relu2')(_bn(f'{name}_bn2')(y))
  y = _conv(filters, 3, 1, f'{name}_conv2')(y)
  if stride != 1 or in_filters != filters:
    if shortcut == 'conv':
      residual = _conv(filters, 1, stride, f'{name}_shortcut')(residual)
    else:
      # The reference's parameter-free shortcut: average-pool, then zero channels on both sides.
      residual = keras.layers.AveragePooling2D(stride, name=f'{name}_shortcut_pool')(residual)
      extra = filters - in_filters
      residual = keras.ops.pad(residual, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
  return keras.layers.Add(name=f'{name}_add')([y, residual])


def preact_resnet(
  input_shape,
  num_classes,
  filters=(16, 32, 64),
  units_per_stage=3,
  shortcut='pad',
  name='preact_resnet',
):
  """Builds the reference's small pre-activation ResNet (ResNet-20-like).

  3x3 conv stem with filters[0] channels; per stage `units_per_stage` pre-activation units, the
  first
  with stride 2 from the second stage on; final BN-ReLU, global average pool, dense K.

  Args:
    input_shape: (H, W, C) of the images, e.g. (32, 32, 3).
    num_classes: K.
    filters: channels per stage.
    units_per_stage: residual units per stage.
    shortcut: where the shape changes, 'pad' (the reference: 2x2 average pool and zero channels, no
      parameters) or 'conv' (a strided 1x1 convolution, He et al.'s projection).
    name: the model's name.

  Returns:
    A functional keras.Model: images float32 [B, H, W, C] in [0, 1] -> logits [B, K].
  """
  if shortcut not in ('pad', 'conv'):
    raise ValueError(f"shortcut must be 'pad' or 'conv', got {shortcut!r}")
  inputs = keras.Input(shape=tuple(input_shape), name='images')
  x = _conv(filters[0], 3, 1, 'stem_conv')(inputs)
  for stage, stage_filters in enumerate(filters):
    for unit in range(units_per_stage):
      stride = 2 if stage > 0 and unit == 0 else 1
      # The reference shares the first BN-ReLU with the shortcut in the first unit of every stage
      # (its list says only stage 1, but it always reads the list's first entry).
      x = _preact_unit(
        x,
        stage_filters,
        stride,
        activate_shortcut=unit == 0,
        shortcut=shortcut,
        name=f'stage{stage + 1}_unit{unit + 1}',
      )
  x = keras.layers.ReLU(name='final_relu')(_bn('final_bn')(x))
  return keras.Model(inputs, _logits(x, num_classes), name=name)


# --------------------------------------------------------------------------------------------------
# ResNet-18, CIFAR variant (3x3 stem, no max-pool).
# --------------------------------------------------------------------------------------------------


def _basic_block(x, filters, stride, name):
  """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; x: [B, H, W, C] -> [B, H/s, W/s, F]."""
  y = _conv(filters, 3, stride, f'{name}_conv1')(x)
  y = keras.layers.ReLU(name=f'{name}_relu1')(_bn(f'{name}_bn1')(y))
  y = _conv(filters, 3, 1, f'{name}_conv2')(y)
  y = _bn(f'{name}_bn2')(y)
  residual = x
  if stride != 1 or x.shape[-1] != filters:
    residual = _bn(f'{name}_shortcut_bn')(_conv(filters, 1, stride, f'{name}_shortcut')(x))
  y = keras.layers.Add(name=f'{name}_add')([y, residual])
  return keras.layers.ReLU(name=f'{name}_relu2')(y)


def resnet18(input_shape, num_classes, name='resnet18'):
  """Builds ResNet-18 for 32x32 images: stem conv3x3x64-BN-ReLU, 4 stages of 2 basic blocks.

  Stages have 64/128/256/512 filters and strides 1/2/2/2; then global average pool and dense K.

  Args:
    input_shape: (H, W, C) of the images, e.g. (32, 32, 3).
    num_classes: K.
    name: the model's name.

  Returns:
    A functional keras.Model: images float32 [B, H, W, C] in [0, 1] -> logits [B, K].
  """
  inputs = keras.Input(shape=tuple(input_shape), name='images')
  x = _conv(64, 3, 1, 'stem_conv')(inputs)
  x = keras.layers.ReLU(name='stem_relu')(_bn('stem_bn')(x))
  for stage, (filters, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
    for block in range(2):
      x = _basic_block(
        x, filters, stride if block == 0 else 1, f'stage{stage + 1}_block{block + 1}'
      )
  return keras.Model(inputs, _logits(x, num_classes), name=name)


# --------------------------------------------------------------------------------------------------
# Inference with batch norm folded, for PGD on CPU.
# --------------------------------------------------------------------------------------------------


def _bn_affine(bn):
  """Inference batch norm as x * a + b: a, b float32 [C] from the layer's current variables."""
  a = bn.gamma * tf.math.rsqrt(bn.moving_variance + bn.epsilon)
  return a, bn.beta - bn.moving_mean * a


def preact_inference_logits(model):
  """Returns logits_fn(u) = model(u, training=False) for a preact_resnet, batch norm folded.

  Performance only (the values agree up to float32 round-off; tests/models/test_models.py): every
  conv1 -> bn2 -> ReLU of a unit becomes one convolution with the batch-norm scale folded into its
  kernel plus a bias, which oneDNN runs as a fused convolution + bias + ReLU, and its input
  gradient skips the batch-norm multiply. About 5-10% of PGD's pass on CPU (BUILD.md). The
  kernels and statistics are read on every call, so the function follows training. The model's
  variables and layers are not changed. Float32 models only (mixed precision keeps the model).

  Args:
    model: built by preact_resnet (any filters, units_per_stage, shortcut).

  Returns:
    logits_fn: float32 [B, H, W, C] in [0, 1] -> float32 logits [B, K].
  """
  layers = {layer.name: layer for layer in model.layers}
  units = []
  for name in layers:  # Functional models list layers in the order they were built.
    parts = name.split('_')
    if len(parts) >= 3 and parts[0].startswith('stage') and parts[1].startswith('unit'):
      unit = f'{parts[0]}_{parts[1]}'
      if unit not in units:
        units.append(unit)
  needed = ['stem_conv', 'final_bn', 'logits'] + [
    f'{u}_{part}' for u in units for part in ('bn1', 'conv1', 'bn2', 'conv2')
  ]
  missing = [n for n in needed if n not in layers]
  if not units or missing:
    raise ValueError(f'{model.name!r} is not a preact_resnet: missing layers {missing or "stage*"}')

  def conv(x, layer, kernel=None):
    stride = layer.strides[0]
    return tf.nn.conv2d(x, layer.kernel if kernel is None else kernel, stride, 'SAME')

  def logits_fn(u):
    x = conv(u, layers['stem_conv'])
    for unit in units:
      a1, b1 = _bn_affine(layers[f'{unit}_bn1'])
      y = tf.nn.relu(x * a1 + b1)
      conv1, conv2 = layers[f'{unit}_conv1'], layers[f'{unit}_conv2']
      # The first unit of a stage feeds the shortcut the pre-activated input (preact_resnet).
      residual = y if unit.endswith('_unit1') else x
      a2, b2 = _bn_affine(layers[f'{unit}_bn2'])
      y = tf.nn.relu(tf.nn.bias_add(conv(y, conv1, conv1.kernel * a2), b2))
      y = conv(y, conv2)
      if f'{unit}_shortcut' in layers:
        residual = conv(residual, layers[f'{unit}_shortcut'])
      elif f'{unit}_shortcut_pool' in layers:
        size = layers[f'{unit}_shortcut_pool'].pool_size[0]
        residual = tf.nn.avg_pool2d(residual, size, size, 'VALID')
        extra = y.shape[-1] - residual.shape[-1]
        residual = tf.pad(residual, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
      x = y + residual
    a, b = _bn_affine(layers['final_bn'])
    x = tf.reduce_mean(tf.nn.relu(x * a + b), axis=[1, 2])
    head = layers['logits']
    return tf.matmul(x, head.kernel) + head.bias

  return logits_fn
