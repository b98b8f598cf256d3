"""Your own Keras model by name: `config.model = 'package.module:factory'`.

`factory(input_shape, num_classes)` must return a keras.Model that maps images float32
[B, H, W, C] in [0, 1] to logits float32 [B, K] (no softmax). check_model verifies that at start.

The paper's guarantee (Theorem 3.1: far from the data a ReLU network is almost surely
overconfident, which is why ACET trains low confidence on noise) and its piecewise-affine
pictures hold for networks whose logits are piecewise affine in the input: ReLU-type activations,
max/average pooling, batch norm (affine at inference), dense and convolution layers. Other
layers (tanh, sigmoid, GELU, softmax attention, layer norm, ...) are allowed but only warned
about: training works, the theorem just does not describe them.
"""

import importlib
import warnings

import keras
import numpy as np

# Activations that keep the logits piecewise affine in the input.
PIECEWISE_AFFINE_ACTIVATIONS = (
  'relu',
  'relu6',
  'leaky_relu',
  'linear',
  'hard_sigmoid',
  'hard_tanh',
)
# Layer classes that are affine, piecewise affine, or the identity at inference.
_PIECEWISE_AFFINE_LAYERS = (
  'InputLayer',
  'Dense',
  'EinsumDense',
  'Conv1D',
  'Conv2D',
  'Conv3D',
  'DepthwiseConv2D',
  'SeparableConv2D',
  'Conv2DTranspose',
  'BatchNormalization',
  'MaxPooling1D',
  'MaxPooling2D',
  'AveragePooling1D',
  'AveragePooling2D',
  'GlobalMaxPooling2D',
  'GlobalAveragePooling2D',
  'GlobalMaxPooling1D',
  'GlobalAveragePooling1D',
  'Flatten',
  'Reshape',
  'Permute',
  'ZeroPadding2D',
  'Cropping2D',
  'Dropout',
  'SpatialDropout2D',
  'GaussianNoise',
  'Add',
  'Subtract',
  'Average',
  'Maximum',
  'Minimum',
  'Concatenate',
  'ReLU',
  'LeakyReLU',
  'PReLU',
  'Identity',
  'Rescaling',
  'UpSampling2D',
  'RandomFlip',
  'RandomCrop',
  'RandomTranslation',
)


class ModelCheckError(ValueError):
  """A model given by name cannot be used; the message names the factory and the problem."""


def is_factory_name(name):
  return isinstance(name, str) and ':' in name


def load_factory(name):
  """'package.module:factory' -> the callable; ModelCheckError naming what is missing."""
  module_name, _, attr = name.partition(':')
  if not module_name or not attr:
    raise ModelCheckError(f"model {name!r}: write 'package.module:factory'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ModelCheckError(
      f'model {name!r}: cannot import module {module_name!r} ({e}); is it on '
      'PYTHONPATH (run from the folder that holds it)?'
    ) from e
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise ModelCheckError(f'model {name!r}: module {module_name} has no function {attr!r}.')
  return factory


def _activation_name(fn):
  name = getattr(fn, '__name__', None) or type(fn).__name__
  return name.lower()


def non_piecewise_affine_layers(model):
  """['layer (what)', ...] of the layers that may make the logits not piecewise affine."""
  found = []
  for layer in model._flatten_layers(include_self=False):
    if isinstance(layer, keras.Model):
      continue  # Its own layers are visited.
    kind = type(layer).__name__
    activation = getattr(layer, 'activation', None)
    if kind == 'Activation' or (activation is not None and kind in _PIECEWISE_AFFINE_LAYERS):
      name = _activation_name(activation)
      if name not in PIECEWISE_AFFINE_ACTIVATIONS:
        found.append(f'{layer.name} (activation {name})')
    elif kind not in _PIECEWISE_AFFINE_LAYERS:
      found.append(f'{layer.name} ({kind})')
  return found


def check_model(model, name, input_shape, num_classes):
  """Raises ModelCheckError unless `model` takes [B, *input_shape] and gives float32 [B, K] logits.

  Warns (UserWarning) if a layer is not known to be piecewise affine (Theorem 3.1's setting).
  """
  shape, k = tuple(input_shape), int(num_classes)
  if not isinstance(model, keras.Model):
    raise ModelCheckError(f'model {name!r} returned a {type(model).__name__}, not a keras.Model.')
  inputs = model.inputs if hasattr(model, 'inputs') and model.built else None
  if inputs is not None and len(inputs) != 1:
    raise ModelCheckError(f'model {name!r} has {len(inputs)} inputs; it must take one, the images.')
  if inputs is not None and tuple(inputs[0].shape[1:]) != shape:
    raise ModelCheckError(
      f'model {name!r} takes inputs of shape {tuple(inputs[0].shape[1:])}, but '
      f'the images are {shape} (H, W, C): build it with the input_shape the '
      'factory receives.'
    )
  probe = np.random.default_rng(0).uniform(0, 1, (2,) + shape).astype(np.float32)
  try:
    out = model(probe, training=False)
  except Exception as e:  # Whatever the user's model raises on the images.
    dims = ', '.join(map(str, shape))
    raise ModelCheckError(
      f'model {name!r} fails on a batch of images [2, {dims}]: {type(e).__name__}: {e}'
    ) from e
  if isinstance(out, (list, tuple, dict)):
    raise ModelCheckError(
      f'model {name!r} returns a {type(out).__name__}; it must return one '
      f'tensor of logits [B, {k}].'
    )
  if tuple(out.shape) != (2, k):
    raise ModelCheckError(
      f'model {name!r} returns shape {tuple(out.shape)} for 2 images; it must '
      f'return logits [B, {k}] for the {k} classes.'
    )
  dtype = keras.backend.standardize_dtype(out.dtype)
  if dtype != 'float32':
    raise ModelCheckError(
      f'model {name!r} returns {dtype} logits; they must be float32 (under '
      "mixed precision give the last layer dtype='float32')."
    )
  values = np.asarray(out)
  if np.allclose(values.sum(axis=1), 1.0, atol=1e-4) and values.min() >= 0:
    raise ModelCheckError(
      f'model {name!r} seems to return probabilities (each row >= 0, sums to '
      '1); return the logits, without the softmax: the losses apply it.'
    )
  others = non_piecewise_affine_layers(model)
  if others:
    warnings.warn(
      f'model {name!r} has layers that are not piecewise affine: {", ".join(others[:5])}'
      f"{' ...' if len(others) > 5 else ''}. Training works, but the paper's Theorem 3.1 (why "
      'ReLU networks are overconfident far from the data, and why ACET fixes it) and its '
      'piecewise-affine pictures assume ReLU-type activations and max/average pooling.',
      UserWarning,
      stacklevel=3,
    )


def create(name, input_shape, num_classes):
  """Builds `factory(input_shape, num_classes)` of `name` and checks it (check_model)."""
  factory = load_factory(name)
  try:
    model = factory(tuple(input_shape), int(num_classes))
  except Exception as e:  # Whatever the user's factory raises.
    raise ModelCheckError(f'model {name!r}: the factory raised {type(e).__name__}: {e}') from e
  check_model(model, name, input_shape, num_classes)
  return model
