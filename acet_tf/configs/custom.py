"""Your own data (and optionally your own model): a folder of images per class, or an .npz file.

  python -m acet_tf.train --workdir=runs/my_acet \
      --config=configs/custom.py:acet,data=folder:/path/to/images,image_size=64

Argument (comma-separated): `plain`, `ceda` or `acet`, and
  data=folder:PATH    one sub-folder of images per class (PATH/train + PATH/test, or split here)
  data=npz:PATH       arrays x_train, y_train, x_test, y_test (acet_tf/data/custom_data.py)
  image_size=S        resize every image to S x S (default 0: keep; all must then have one size)
  channels=1|3        grey or RGB (default 0: grey if every image is grey, else RGB)
  test_fraction=F     share of each class held out for testing without a test/ folder (0.2)
  model=NAME          preact_resnet (default), resnet18, lenet, or package.module:factory
  epochs=N            training epochs (default 100)
  batch_size=B        clean images per step (default 128)
  flip                random horizontal flips (only if a mirrored image keeps its class)
  runlocal            a smoke run of seconds
A path may not contain ','. The ResNets train with the paper's SVHN/CIFAR recipe (SGD with
momentum, rate 0.1); LeNet and your own models with its MNIST recipe (Adam, 1e-3), the safer
choice for an architecture the recipe was not tuned on. Everything else is configs/common.py's
base_config (the paper's noise and 40-step PGD), changeable with --config.KEY=VALUE.
"""

from acet_tf.configs import common


def get_config(arg=None):
  a = common.parse_arg(
    arg,
    data='',
    model='preact_resnet',
    image_size=0,
    channels=0,
    test_fraction=0.2,
    epochs=100,
    batch_size=128,
    flip=False,
    runlocal=False,
  )
  if not a.data.startswith(('folder:', 'npz:')):
    raise ValueError(
      f'configs/custom.py needs data=folder:PATH or data=npz:PATH, got '
      f"{a.data!r} (for the paper's datasets use configs/<dataset>.py)."
    )
  c = common.base_config(a.method)
  c.dataset = a.data
  c.model = a.model
  c.image_size = a.image_size
  c.channels = a.channels
  c.test_fraction = a.test_fraction
  c.num_epochs = a.epochs
  c.batch_size = a.batch_size
  c.augment.flip = a.flip
  if a.model not in ('preact_resnet', 'resnet18'):
    c.optimizer.name = 'adam'
    c.optimizer.learning_rate = 1e-3
  if a.runlocal:
    common.runlocal(c)
  return c
