"""SVHN with the reference's pre-activation ResNet, the paper's recipe (SGD+momentum 0.1, 100 epochs).

  python -m acet_tf.train --config=configs/svhn.py:acet --workdir=runs/svhn_acet
Argument: `plain`, `ceda` or `acet`, optionally `,runlocal` for a smoke run of seconds, and
`model=resnet18` for ResNet-18 instead of the small pre-activation ResNet.
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, model='preact_resnet')
  c = common.base_config(a.method)
  c.dataset = 'svhn_cropped'
  c.model = a.model
  c.augment.flip = False
  if a.runlocal:
    common.runlocal(c)
  return c
