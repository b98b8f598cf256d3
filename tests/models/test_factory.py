"""config.model = 'package.module:factory' (acet_tf/models/factory.py): checks and warnings."""

import warnings

import numpy as np
import pytest

from acet_tf import models
from acet_tf.configs import custom
from acet_tf.training import trainer
from tests import support

SHAPE = (16, 16, 3)
HELPERS = 'tests.model_factories'


def _create(factory, shape=SHAPE, k=3):
  return models.create_model(f'{HELPERS}:{factory}', shape, k)


def test_a_valid_factory_builds_logits_without_warning():
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # Any warning fails the test.
    model = _create('small_cnn')
  logits = model(np.zeros((4,) + SHAPE, np.float32), training=False)
  assert tuple(logits.shape) == (4, 3)
  assert model.name == 'small_cnn'


def test_builtin_models_are_piecewise_affine():
  for name, shape in (('lenet', (28, 28, 1)), ('preact_resnet', (32, 32, 3))):
    assert not models.factory.non_piecewise_affine_layers(models.create_model(name, shape, 10))


def test_non_relu_layers_warn_but_build():
  with pytest.warns(
    UserWarning,
    match=r'not piecewise affine: .*activation tanh.*'
    r'LayerNormalization.*Theorem 3.1',
  ):
    model = _create('tanh_mlp')
  assert tuple(model(np.zeros((2,) + SHAPE, np.float32)).shape) == (2, 3)


@pytest.mark.parametrize(
  'factory, message',
  [
    ('fixed_input', r'takes inputs of shape \(8, 8, 1\), but the images are \(16, 16, 3\)'),
    ('wrong_classes', r'returns shape \(2, 4\) for 2 images; it must return logits \[B, 3\]'),
    ('softmax_output', 'seems to return probabilities'),
    ('float16_logits', 'returns float16 logits; they must be float32'),
    ('not_a_model', 'returned a str, not a keras.Model'),
    ('NOT_CALLABLE', "has no function 'NOT_CALLABLE'"),
  ],
)
def test_bad_factories_are_refused_with_the_reason(factory, message):
  with pytest.raises(models.ModelCheckError, match=f"model '{HELPERS}:{factory}'.*{message}"):
    _create(factory)


def test_bad_names():
  with pytest.raises(models.ModelCheckError, match="cannot import module 'no_such_pkg.mod'"):
    models.create_model('no_such_pkg.mod:f', SHAPE, 3)
  with pytest.raises(ValueError, match="Unknown model 'resnet50'.*'package.module:factory'"):
    models.check_name('resnet50')
  for bad in (':f', 'pkg:', 'a:b:c'):
    with pytest.raises(ValueError, match='Unknown model'):
      models.check_name(bad)
  models.check_name(f'{HELPERS}:small_cnn')  # Parsed only; nothing imported.


def test_train_checks_the_factory_before_the_first_step(tmp_path):

  root = str(tmp_path / 'data')
  support.make_image_folder(root, ['a', 'b', 'c'], per_class=8, size=(16, 16))
  config = custom.get_config(f'plain,data=folder:{root},model={HELPERS}:wrong_classes,runlocal')
  config.strategy = 'one_device'
  with pytest.raises(models.ModelCheckError, match=r'must return logits \[B, 3\]'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  config.model = 'bad name'
  with pytest.raises(ValueError, match='Bad config: model: Unknown model'):
    trainer.validate_config(config)
