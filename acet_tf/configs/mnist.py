"""MNIST with LeNet, the paper's recipe (Adam 1e-3, 100 epochs, batch 128).

  python -m acet_tf.train --config=configs/mnist.py:acet --workdir=runs/mnist_acet
Argument: `plain`, `ceda` or `acet`, optionally `,runlocal` for a smoke run of seconds.
"""

from acet_tf.configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False)
  c = common.base_config(a.method)
  c.dataset = 'mnist'
  c.model = 'lenet'
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 1e-3
  if a.runlocal:
    common.runlocal(c)
  return c
