"""Adversarial-noise MMC of a run from two starts: raw uniform noise, or the paper's blurred noise.

  python -m tools.adv_noise_start --workdir=runs/paper_cifar10_acet --points=100

The paper's 200-step attack (eps 0.3, step 0.0075, max log-confidence, one random start) from
(a) `raw`: x ~ U[0, 1]^d, and (b) `blurred`: the uniform half of the paper's noise (Gaussian blur,
min-max rescale; what acet_tf.evaluate uses without training images). Prints both MMCs.
"""

import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.ops import noise as noise_lib
from acet_tf.ops import pgd

_WORKDIR = flags.DEFINE_string('workdir', None, 'An acet_tf run.')
_POINTS = flags.DEFINE_integer('points', 100, 'Noise images per start.')


def mmc_after_attack(model, images, seed):
  predict = predictions_lib.make_predict_fn(model)
  batches = [(tf.constant(images), tf.zeros([len(images)], tf.int32))]
  adv = list(
    predictions_lib.attack_batches(
      model,
      batches,
      pgd.max_log_confidence_objective,
      eps=0.3,
      step_size=0.0075,
      steps=200,
      seed=seed,
      name='adv_noise',
    )
  )
  return float(predictions_lib.predict_batches(predict, adv).confidence.mean())


def main(argv):
  del argv
  model, config, info, _ = runs.restore_model(_WORKDIR.value)
  n, shape = _POINTS.value, info.image_shape
  raw = tf.random.stateless_uniform([n, *shape], seed=[int(config.seed), 21]).numpy()
  noise_config = noise_lib.paper_noise_config()
  noise_config.permuted_fraction = 0.0
  blurred = noise_lib.make_noise(
    tf.zeros([n, *shape]), tf.constant([int(config.seed), 22]), noise_config
  ).numpy()
  for name, images in (('raw', raw), ('blurred', blurred)):
    start = time.time()
    mmc = mmc_after_attack(model, images.astype(np.float32), tf.constant([int(config.seed), 23]))
    print(
      f'{_WORKDIR.value} start={name}: adversarial-noise MMC {mmc:.3f} over {n} points, '
      f'{time.time() - start:.0f} s'
    )


if __name__ == '__main__':
  app.run(main)
