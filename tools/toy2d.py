"""Two moons in [0, 1]^2: the paper's phenomenon in pictures (plain vs CEDA vs ACET).

  python -m tools.toy2d --out=/tmp/toy2d
  python -m tools.toy2d --out=/tmp/toy2d --options=steps=1000,seed=1   # quicker, rougher

Trains a small ReLU MLP on two moons with the project's own train step, losses and PGD (only the
out-distribution differs: uniform points in the box instead of noise images) and writes:
  confidence.png       max softmax over [0, 1]^2 with the training points, one panel per method;
  confidence_far.png   the same over [-10, 10]^2 and [-1000, 1000]^2: far from the data every
                       model is confident again (Theorem 3.1), ACET included;
  linear_regions.png   the plain model's ReLU activation patterns: the polytopes on which the
                       network is affine, bounded near the data and unbounded outside (Figure 1);
  rays.png             max softmax along alpha * x, alpha in [1, 1e4], for a few x in the box.
"""

import os

from absl import app
from absl import flags
from absl import logging
import keras
from matplotlib import colors as mpl_colors
from matplotlib.figure import Figure
import ml_collections
import numpy as np
import tensorflow as tf

from acet_tf.configs import common
from acet_tf.ops import seed_streams
from acet_tf.training import train_step

BOX = (0.0, 1.0)  # The input domain: data and noise live here, like images in [0, 1]^d.
FAR = (-10.0, 10.0)  # The zoomed-out view.
# Further out still: where ACET's confidence has returned to 1 as well (Theorem 3.1).
FARTHER = (-1000.0, 1000.0)
ALPHAS = np.logspace(0.0, 4.0, 161)  # The ray plot's alpha in [1, 1e4].
PNG_DPI = 80  # Small PNGs: they go into the README.


# ----------------------------------------------------------------------------------------------
# Config, data, model.
# ----------------------------------------------------------------------------------------------


def get_config(arg=None):
  """The toy's hyperparameters on top of the paper's recipe (configs/common.base_config).

  Args:
    arg: 'plain', 'ceda' or 'acet', optionally with ',steps=N' (train steps) and ',seed=N'.

  Returns:
    A ConfigDict like the image configs plus `toy` (data and MLP sizes).
  """
  a = common.parse_arg(arg, steps=3000, seed=0)
  if a.steps <= 0:
    raise ValueError(f'steps must be > 0, got {a.steps}')
  c = common.base_config(a.method)
  c.dataset = 'two_moons'
  c.model = 'mlp'
  c.seed = a.seed
  c.batch_size = 128  # Clean points per step; as many uniform noise points again (lambda = 1).
  c.num_train_steps = a.steps
  c.steps_per_call = 50
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 5e-3
  c.weight_decay = 1e-4
  # ACET's ball: half the gap between the moons (about 0.1). With eps = 0.1 the balls around the
  # noise cover most of the moons and training often sits for 1000+ steps at the uniform output.
  c.pgd.eps = 0.05
  if a.method == 'acet':
    c.pgd.steps = 10
    c.pgd.step_size = 0.01
  c.toy = ml_collections.ConfigDict()
  c.toy.num_points = 512  # Training points, half per moon.
  c.toy.moon_noise = 0.08  # Gaussian jitter in moon units (each moon has radius 1).
  c.toy.hidden = (64, 64, 64)  # Widths of the ReLU layers.
  return c


def two_moons(num_points, noise, seed):
  """The two-moons problem, rescaled into the middle of [0, 1]^2.

  Args:
    num_points: total number of points, half per class.
    noise: std of the Gaussian jitter in moon units (radius 1); the box scale is 1/5 of that.
    seed: int, numpy seed.

  Returns:
    (points float32 [N, 2] in [0, 1] (the moons fill about [0.2, 0.8] x [0.33, 0.67]),
     labels int32 [N] in {0, 1}).
  """
  rng = np.random.default_rng(seed)
  n0 = num_points // 2
  n1 = num_points - n0
  t0 = rng.uniform(0.0, np.pi, n0)
  t1 = rng.uniform(0.0, np.pi, n1)
  upper = np.stack([np.cos(t0), np.sin(t0)], axis=1)
  lower = np.stack([1.0 - np.cos(t1), 0.5 - np.sin(t1)], axis=1)
  points = np.concatenate([upper, lower]) + noise * rng.standard_normal((num_points, 2))
  labels = np.concatenate([np.zeros(n0), np.ones(n1)]).astype(np.int32)
  # Moons span [-1, 2] x [-0.5, 1]: centre them at (0.5, 0.5) at 1/5 scale.
  points = (points - np.array([0.5, 0.25])) / 5.0 + 0.5
  order = rng.permutation(num_points)
  return np.clip(points[order], 0.0, 1.0).astype(np.float32), labels[order]


def mlp(hidden, num_classes=2):
  """ReLU MLP: points float32 [B, 2] -> logits float32 [B, num_classes], piecewise affine.

  The ReLU layers are named 'hidden_<i>' so activation_patterns can read them.
  """
  inputs = keras.Input(shape=(2,), name='points')
  x = inputs
  for i, width in enumerate(hidden):
    x = keras.layers.Dense(width, activation='relu', name=f'hidden_{i}')(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes, name='logits')(x), name='mlp')


def uniform_box_noise(points, seed):
  """noise_fn of the train step: uniform points in the box, one per input point.

  points: float32 [B, 2] (only the shape is used); seed: int [2]. Returns float32 [B, 2] in BOX.
  """
  return seed_streams.uniform(seed, points.shape[0], points.shape[1:], *BOX)


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------


def train(config):
  """Trains the MLP per `config` with train_step.make_train_function on one device.

  Returns:
    (model, points float32 [N, 2] in [0, 1], labels int32 [N], {'loss', 'error' and, with noise,
    'mmc_out' (mean max softmax on the noise the step trained on)} over the last call's steps).
  """
  if config.model != 'mlp' or config.dataset != 'two_moons':
    raise ValueError(f'toy2d trains mlp on two_moons, got {config.model} on {config.dataset}')
  points, labels = two_moons(config.toy.num_points, config.toy.moon_noise, config.seed)
  keras.utils.set_random_seed(config.seed)  # The initial weights.
  strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
  total = config.num_train_steps
  with strategy.scope():
    model = mlp(tuple(config.toy.hidden))
    optimizer = train_step.create_optimizer(config, total)
    optimizer.build(model.trainable_variables)
  stream = (
    tf.data.Dataset.from_tensor_slices((points, labels))
    .shuffle(len(labels), seed=config.seed + 1)
    .repeat()
    .batch(config.batch_size, drop_remainder=True)
  )
  iterator = iter(strategy.experimental_distribute_dataset(stream))
  train_steps = train_step.make_train_function(
    model, optimizer, config, strategy, noise_fn=uniform_box_noise
  )
  done, final = 0, {}
  while done < total:
    num = min(config.steps_per_call, total - done)
    sums, bad_step = train_steps(iterator, tf.constant(num))
    if int(bad_step) >= 0:
      raise FloatingPointError(f'{config.method}: non-finite loss at step {int(bad_step)}.')
    done += num
    final = {
      'loss': float(sums['loss']) / num,
      'error': float(sums['errors']) / float(sums['count_in']),
    }
    if float(sums['count_out']) > 0:
      final['mmc_out'] = float(sums['conf_out']) / float(sums['count_out'])
  logging.info(
    '%s: %d steps, last %d: %s',
    config.method,
    done,
    num,
    ', '.join(f'{k} {v:.4f}' for k, v in final.items()),
  )
  return model, points, labels, final


# ----------------------------------------------------------------------------------------------
# What the figures show, as numbers.
# ----------------------------------------------------------------------------------------------


def logits_of(model, points, batch_size=16384):
  """points float32 [N, 2] (anywhere in R^2) -> logits float64 [N, K]."""
  points = np.asarray(points, np.float32)
  return np.concatenate(
    [
      np.asarray(model(points[i : i + batch_size], training=False), np.float64)
      for i in range(0, len(points), batch_size)
    ]
  )


def confidence_of(model, points):
  """Max softmax float64 [N] in [1/K, 1] at points float32 [N, 2]."""
  z = logits_of(model, points)
  z -= z.max(axis=1, keepdims=True)
  return 1.0 / np.exp(z).sum(axis=1)  # max_k softmax = exp(0) / sum exp(z - max).


def grid(lo, hi, resolution):
  """Cell centres of a resolution x resolution grid over [lo, hi]^2: float32 [R * R, 2].

  Row-major with y increasing down the rows, x along them (reshape to [R, R] for imshow with
  origin='lower').
  """
  ticks = lo + (np.arange(resolution) + 0.5) * (hi - lo) / resolution
  xs, ys = np.meshgrid(ticks, ticks)
  return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def far_from_data(points, data, margin):
  """bool [N]: points farther than `margin` (Euclidean) from every data point. [N, 2], [M, 2]."""
  d2 = ((points[:, None, :] - data[None, :, :]) ** 2).sum(-1)
  return d2.min(axis=1) > margin**2


def activation_patterns(model, points):
  """Which ReLUs are on at each point, as region ids.

  Args:
    model: an mlp() (reads the layers named 'hidden_*').
    points: float32 [N, 2].

  Returns:
    int64 [N] region ids in [0, P): points with equal ids share the activation pattern of every
    hidden unit, so the network is one affine map on them (a linear region).
  """
  hidden = [layer.output for layer in model.layers if layer.name.startswith('hidden_')]
  if not hidden:
    raise ValueError(f'model {model.name} has no layers named hidden_*')
  reader = keras.Model(model.input, hidden)
  points = np.asarray(points, np.float32)
  on = np.concatenate([np.asarray(a) > 0 for a in reader(points, training=False)], axis=1)
  _, ids = np.unique(np.packbits(on, axis=1), axis=0, return_inverse=True)
  return ids.ravel()


def ray_directions(num, seed):
  """`num` points x uniform in [0, 1]^2 (the paper's Table 2 draws x this way): float32 [num, 2]."""
  return np.random.default_rng(seed).uniform(*BOX, size=(num, 2)).astype(np.float32)


def ray_confidence(model, directions, alphas=ALPHAS):
  """Max softmax along alpha * x: float64 [D, A] for directions [D, 2] and alphas [A]."""
  points = (alphas[None, :, None] * directions[:, None, :]).reshape(-1, 2)
  return confidence_of(model, points).reshape(len(directions), len(alphas))


def summarize(models, data, margin=0.1, resolution=100):
  """The numbers behind the pictures, per method.

  Returns:
    {method: {'mmc_box_far': mean confidence on the grid over [0, 1]^2 farther than `margin`
    from the data, 'mmc_data': mean confidence on the data, 'mmc_far_view': on [-10, 10]^2}};
    plus 'plain_regions_box' (distinct activation patterns of the plain model on the box grid)
    when a plain model is given.
  """
  box = grid(*BOX, resolution)
  far = far_from_data(box, data, margin)
  out = {}
  for method, model in models.items():
    out[method] = {
      'mmc_box_far': float(confidence_of(model, box[far]).mean()),
      'mmc_data': float(confidence_of(model, data).mean()),
      'mmc_far_view': float(confidence_of(model, grid(*FAR, resolution)).mean()),
    }
  if 'plain' in models:
    out['plain_regions_box'] = int(activation_patterns(models['plain'], box).max() + 1)
  return out


# ----------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------


def _scatter(ax, points, labels):
  ax.scatter(
    points[:, 0], points[:, 1], c=np.where(labels == 0, 'tab:red', 'tab:blue'), s=3, linewidths=0
  )


def plot_confidence(models, points, labels, path, views, resolution=200):
  """Max softmax (colour 1/K .. 1) with the data: a row per view (lo, hi), a panel per method."""
  fig = Figure(figsize=(3.0 * len(models) + 0.8, 3.0 * len(views)))
  axes = fig.subplots(len(views), len(models), squeeze=False)
  for row, (lo, hi) in zip(axes, views):
    for ax, (method, model) in zip(row, models.items()):
      conf = confidence_of(model, grid(lo, hi, resolution)).reshape(resolution, resolution)
      image = ax.imshow(
        conf,
        origin='lower',
        extent=(lo, hi, lo, hi),
        cmap='viridis',
        vmin=1.0 / model.output_shape[-1],
        vmax=1.0,
        interpolation='nearest',
      )
      if hi - lo > 2 * (BOX[1] - BOX[0]):  # Zoomed out: mark the data box.
        ax.add_patch(_box_patch())
      _scatter(ax, points, labels)
      ax.set_title(f'{_title(method)} on [{lo:g}, {hi:g}]$^2$', fontsize=9)
      ax.set_xlim(lo, hi)
      ax.set_ylim(lo, hi)
      ax.tick_params(labelsize=7)
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, label='max softmax')
  fig.savefig(path, dpi=PNG_DPI, bbox_inches='tight')
  return path


def _title(method):
  return 'plain' if method == 'plain' else method.upper()


def _box_patch():
  from matplotlib.patches import Rectangle

  return Rectangle(
    (BOX[0], BOX[0]), BOX[1] - BOX[0], BOX[1] - BOX[0], fill=False, edgecolor='white', linewidth=0.8
  )


def plot_linear_regions(model, points, labels, path, resolution=300):
  """The plain model's activation patterns on [0, 1]^2 and on [-10, 10]^2, random colours."""
  fig = Figure(figsize=(7.0, 3.4))
  axes = fig.subplots(1, 2)
  rng = np.random.default_rng(0)
  for ax, (lo, hi) in zip(axes, (BOX, FAR)):
    ids = activation_patterns(model, grid(lo, hi, resolution)).reshape(resolution, resolution)
    palette = mpl_colors.ListedColormap(rng.uniform(0.25, 1.0, size=(ids.max() + 1, 3)))
    ax.imshow(ids, origin='lower', extent=(lo, hi, lo, hi), cmap=palette, interpolation='nearest')
    if lo != BOX[0]:
      ax.add_patch(_box_patch())
    _scatter(ax, points, labels)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_title(f'[{lo:g}, {hi:g}]$^2$: {ids.max() + 1} regions on the grid', fontsize=9)
    ax.tick_params(labelsize=7)
  fig.suptitle('linear regions of the plain ReLU MLP', fontsize=10)
  fig.savefig(path, dpi=PNG_DPI, bbox_inches='tight')
  return path


def plot_rays(models, path, num_directions=4, seed=0):
  """Per method: max softmax along alpha * x against alpha (log scale), a few x in the box."""
  directions = ray_directions(num_directions, seed)
  fig = Figure(figsize=(3.2 * len(models), 2.8))
  axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
  for ax, (method, model) in zip(axes, models.items()):
    conf = ray_confidence(model, directions)
    for x, row in zip(directions, conf):
      ax.plot(ALPHAS, row, linewidth=1.2, label=f'x=({x[0]:.2f}, {x[1]:.2f})')
    ax.set_xscale('log')
    ax.set_ylim(1.0 / model.output_shape[-1] - 0.02, 1.02)
    ax.set_xlabel(r'$\alpha$', fontsize=8)
    ax.set_title(_title(method))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(r'max softmax at $\alpha x$', fontsize=8)
  axes[-1].legend(fontsize=6, loc='lower right')
  fig.savefig(path, dpi=PNG_DPI, bbox_inches='tight')
  return path


# ----------------------------------------------------------------------------------------------
# The tool.
# ----------------------------------------------------------------------------------------------


def run(out_dir, options='', methods=common.METHODS):
  """Trains one model per method and writes the four PNGs to `out_dir`.

  Args:
    out_dir: directory for the PNGs (created).
    options: extra get_config options for every method, e.g. 'steps=300'.
    methods: which of plain/ceda/acet to train (linear_regions.png needs 'plain').

  Returns:
    {'files': {name: path}, 'summary': summarize(...), 'train': {method: last train numbers},
     'models': {method: keras model}, 'points', 'labels': the training data}.
  """
  if not methods:
    raise ValueError('methods is empty')
  os.makedirs(out_dir, exist_ok=True)
  models, trained = {}, {}
  for method in methods:
    config = get_config(','.join(w for w in (method, options) if w))
    models[method], points, labels, trained[method] = train(config)
  files = {
    'confidence': plot_confidence(
      models, points, labels, os.path.join(out_dir, 'confidence.png'), [BOX]
    ),
    'confidence_far': plot_confidence(
      models, points, labels, os.path.join(out_dir, 'confidence_far.png'), [FAR, FARTHER]
    ),
    'rays': plot_rays(models, os.path.join(out_dir, 'rays.png')),
  }
  if 'plain' in models:
    files['linear_regions'] = plot_linear_regions(
      models['plain'], points, labels, os.path.join(out_dir, 'linear_regions.png')
    )
  summary = summarize(models, points)
  logging.info('Summary: %s', summary)
  return {
    'files': files,
    'summary': summary,
    'train': trained,
    'models': models,
    'points': points,
    'labels': labels,
  }


def define_flags():
  """The binary's flags; defined only when run as a binary, so importing this module is free."""
  flags.DEFINE_string('out', None, 'Directory for the PNGs (created if missing).')
  flags.DEFINE_string(
    'options', '', "Extra get_config options for every method, e.g. 'steps=300,seed=1'."
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS.out:
    raise app.UsageError('--out is required.')
  result = run(flags.FLAGS.out, flags.FLAGS.options)
  for name, path in result['files'].items():
    print(f'{name}: {path}')
  print(result['summary'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
