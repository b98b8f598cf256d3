"""The classifiers, chosen by name from the config (`config.model`). May import: nothing else of
acet_tf.

Every model maps images float32 [B, H, W, C] in [0, 1] to logits float32 [B, K] (no softmax, no
input normalisation) and uses only ReLU, max/average pooling and (at inference) affine batch norm,
so the logits are piecewise affine in the input, the setting of the paper's Theorem 3.1. Your own
model is named 'package.module:factory' (models/factory.py: checked at creation, warned about if it
is not piecewise affine).
"""

from acet_tf.models import factory
from acet_tf.models.lenet import lenet
from acet_tf.models.prood import ProodModel as ProodModel  # The public name (models.ProodModel).
from acet_tf.models.prood import with_discriminator
from acet_tf.models.resnet import preact_inference_logits
from acet_tf.models.resnet import preact_resnet
from acet_tf.models.resnet import resnet18

_BUILDERS = {
  'lenet': lenet,
  'preact_resnet': preact_resnet,  # The reference's "resnet_small".
  'resnet18': resnet18,
}
MODEL_NAMES = tuple(_BUILDERS)
ModelCheckError = factory.ModelCheckError


def check_name(name):
  """Raises ValueError unless `name` is one of MODEL_NAMES or of the form 'package.module:factory'.

  A factory name is only parsed here; create_model imports and checks it.
  """
  if name in _BUILDERS:
    return
  if factory.is_factory_name(name):
    module_name, _, attr = name.partition(':')
    if module_name and attr and ':' not in attr:
      return
  raise ValueError(
    f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}, or your own '
    "'package.module:factory'."
  )


def create_model(name, input_shape, num_classes):
  """Builds the model `name`, one of MODEL_NAMES; call it inside `strategy.scope()` to distribute
  it.

  Args:
    name: 'lenet', 'preact_resnet' or 'resnet18' (becomes `model.name`), or
      'package.module:factory' with factory(input_shape, num_classes) -> keras.Model of logits.
    input_shape: (H, W, C) of the images.
    num_classes: K.

  Returns:
    A keras.Model: images float32 [B, H, W, C] in [0, 1] -> logits float32 [B, K]. Call it as
    `model(x, training=...)`; with training=False batch norm uses and keeps its moving statistics.
  """
  check_name(name)
  if name not in _BUILDERS:
    return factory.create(name, input_shape, num_classes)
  return _BUILDERS[name](tuple(input_shape), int(num_classes), name=name)


def create_prood_model(classifier_name, input_shape, num_classes, filters=(16, 32), dense=100):
  """A ProodModel (models/prood.py): the classifier `classifier_name` (create_model) and a fresh
  discriminator with conv `filters` and `dense` units; outputs log p(y|x) of the mixture [B, K]."""
  classifier = create_model(classifier_name, input_shape, num_classes)
  return with_discriminator(classifier, input_shape, filters, dense)


def model_for_config(config, input_shape, num_classes):
  """The model a training config trains: create_model(config.model) for every method but prood,
  whose model is the ProodModel of config.model and the discriminator of config.prood."""
  if config.method == 'prood':
    p = config.prood
    return create_prood_model(config.model, input_shape, num_classes, p.disc_filters, p.disc_dense)
  return create_model(config.model, input_shape, num_classes)


def inference_logits_fn(model):
  """Returns logits_fn(u) = model(u, training=False), as fast as known for PGD's inner loop.

  A float32 preact_resnet gets its batch-norm-folded form (resnet.preact_inference_logits, same
  values up to float32 round-off); every other model (and mixed precision) is called as is.
  """
  if model.name == 'preact_resnet' and model.dtype_policy.compute_dtype == 'float32':
    return preact_inference_logits(model)
  return lambda u: model(u, training=False)
