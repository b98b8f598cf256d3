"""Readings of Table 2's second row ("% overconfident" after projecting alpha x back to [0, 1]).

  python -m tools.table2_readings --workdir=runs/paper_cifar10_plain --draws=300

The paper does not define the row exactly and the authors' code has no Table 2 script; this prints
the share of draws with confidence > 0.95 under several readings, on the draws and per-draw alphas
of acet_tf's Table 2 search (alpha_search.table2, seed as acet_tf.evaluate):
  per_draw_alpha   clip(alpha_i x_i, 0, 1), alpha_i the draw's own alpha (acet_tf's definition);
  median_alpha     clip(alpha_med x_i, 0, 1), one alpha for all draws (the row's reported median);
  alpha_1          x_i itself (alpha = 1: uniform noise in [0, 1], nothing to project);
  alpha_2          clip(2 x_i, 0, 1);
  per_draw_unclipped  alpha_i x_i unclipped (100% by construction at 99.9%: a sanity check).
"""

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.evaluation import alpha_search
from acet_tf.evaluation import predictions as predictions_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'An acet_tf run (e.g. an imported one).')
_DRAWS = flags.DEFINE_integer('draws', 300, 'Uniform draws.')


def readings(model, image_shape, draws, seed=0, threshold=0.95):
  """{reading: share of draws with confidence > threshold}, plus 'median_alpha'."""
  predict = predictions_lib.make_predict_fn(model)
  seed = predictions_lib.eval_seed(seed, alpha_search.TABLE2_STREAM)
  _, alphas, _ = alpha_search.table2(predict, image_shape, seed=seed, num_examples=draws)
  x = np.concatenate(list(alpha_search.uniform_noise_batches(seed, image_shape, draws, 500)))
  finite = np.where(np.isfinite(alphas), alphas, 1e6).astype(np.float32)
  median = float(np.median(alphas))

  def share(images):
    conf = np.concatenate(
      [
        predict(tf.constant(b)).numpy().max(axis=1)
        for b in np.array_split(images, max(1, len(images) // 250))
      ]
    )
    return float(np.mean(conf > threshold))

  a = finite.reshape(-1, 1, 1, 1)
  return {
    'median_alpha': median,
    'per_draw_alpha': share(np.clip(a * x, 0, 1)),
    'median_alpha_clipped': share(np.clip(median * x, 0, 1)),
    'alpha_1': share(x),
    'alpha_2': share(np.clip(2 * x, 0, 1)),
    'per_draw_unclipped': share(a * x),
  }


def main(argv):
  del argv
  model, config, info, _ = runs.restore_model(_WORKDIR.value)
  result = readings(model, info.image_shape, _DRAWS.value, seed=int(config.seed))
  print(_WORKDIR.value, {k: round(v, 4) for k, v in result.items()})


if __name__ == '__main__':
  app.run(main)
