"""LeNet of Madry et al.'s MNIST challenge, the paper's MNIST model.

conv 5x5x32 + ReLU, max-pool 2, conv 5x5x64 + ReLU, max-pool 2, dense 1024 + ReLU, dense K; 'same'
padding throughout. Only ReLU and max-pool: the logits are piecewise affine in the input.
"""

import keras


def lenet(input_shape, num_classes, name='lenet'):
  """Builds LeNet.

  Args:
    input_shape: (H, W, C) of the images, e.g. (28, 28, 1).
    num_classes: K.
    name: the model's name.

  Returns:
    A functional keras.Model: images float32 [B, H, W, C] in [0, 1] -> logits [B, K] (float32 also
    under a mixed-precision policy).
  """
  # He initialisation as in the reference code (its biases start at 0, as Keras does).
  init = 'he_normal'
  inputs = keras.Input(shape=tuple(input_shape), name='images')
  x = keras.layers.Conv2D(
    32, 5, padding='same', activation='relu', kernel_initializer=init, name='conv1'
  )(inputs)
  # 'same' pooling like the reference, so odd sizes keep their last row/column.
  x = keras.layers.MaxPooling2D(2, padding='same', name='pool1')(x)
  x = keras.layers.Conv2D(
    64, 5, padding='same', activation='relu', kernel_initializer=init, name='conv2'
  )(x)
  x = keras.layers.MaxPooling2D(2, padding='same', name='pool2')(x)
  x = keras.layers.Flatten(name='flatten')(x)
  x = keras.layers.Dense(1024, activation='relu', kernel_initializer=init, name='fc1')(x)
  # Softmax and log-confidence losses want float32 logits even when the body runs in float16.
  head_dtype = 'float32' if keras.config.dtype_policy().name.startswith('mixed') else None
  logits = keras.layers.Dense(
    num_classes, kernel_initializer=init, dtype=head_dtype, name='logits'
  )(x)
  return keras.Model(inputs, logits, name=name)
