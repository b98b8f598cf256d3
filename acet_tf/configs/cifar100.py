"""CIFAR-100 with the reference's pre-activation ResNet, the paper's recipe
(SGD+momentum 0.1, 100 epochs).

  python -m acet_tf.train --config=configs/cifar100.py:acet --workdir=runs/cifar100_acet
Argument: `plain`, `ceda` or `acet`, optionally `,runlocal` for a smoke run of seconds, and
`model=resnet18` for ResNet-18 instead of the small pre-activation ResNet.
"""

from acet_tf.configs import common


def get_config(arg=None):
  return common.resnet_config(arg, dataset='cifar100', flip=True)
