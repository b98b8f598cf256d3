"""Model factories for the tests of `config.model = 'package.module:factory'` (models/factory.py).

Each is factory(input_shape, num_classes) -> keras.Model; all but `small_cnn` break a rule.
"""

import keras


def small_cnn(input_shape, num_classes):
  """A valid one: ReLU convolutions, max-pooling, logits [B, K]."""
  inputs = keras.Input(shape=input_shape)
  x = keras.layers.Conv2D(8, 3, padding='same', activation='relu')(inputs)
  x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16)(x)
  x = keras.layers.ReLU()(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name='small_cnn')


def tanh_mlp(input_shape, num_classes):
  """Valid, but not piecewise affine (tanh): warned about, not refused."""
  inputs = keras.Input(shape=input_shape)
  x = keras.layers.Dense(16, activation='tanh')(keras.layers.Flatten()(inputs))
  x = keras.layers.LayerNormalization()(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def fixed_input(input_shape, num_classes):
  """Ignores input_shape."""
  del input_shape
  inputs = keras.Input(shape=(8, 8, 1))
  return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))


def wrong_classes(input_shape, num_classes):
  """One logit too many."""
  inputs = keras.Input(shape=input_shape)
  return keras.Model(inputs, keras.layers.Dense(num_classes + 1)(keras.layers.Flatten()(inputs)))


def softmax_output(input_shape, num_classes):
  """Probabilities instead of logits."""
  inputs = keras.Input(shape=input_shape)
  x = keras.layers.Dense(num_classes, activation='softmax')(keras.layers.Flatten()(inputs))
  return keras.Model(inputs, x)


def float16_logits(input_shape, num_classes):
  """float16 logits."""
  inputs = keras.Input(shape=input_shape)
  x = keras.layers.Dense(num_classes, dtype='float16')(keras.layers.Flatten()(inputs))
  return keras.Model(inputs, x)


def not_a_model(input_shape, num_classes):
  del input_shape, num_classes
  return 'a string'


NOT_CALLABLE = 3
