"""CIFAR-10 with the reference's pre-activation ResNet, the paper's recipe (SGD+momentum 0.1, 100 epochs).

  python -m acet_tf.train --config=configs/cifar10.py:acet --workdir=runs/cifar10_acet
Argument: `plain`, `ceda` or `acet`, optionally `,runlocal` for a smoke run of seconds, and
`model=resnet18` for ResNet-18 instead of the small pre-activation ResNet.
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, model='preact_resnet')
  c = common.base_config(a.method)
  c.dataset = 'cifar10'
  c.model = a.model
  c.augment.flip = True
  if a.runlocal:
    common.runlocal(c)
  return c
