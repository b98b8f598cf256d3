"""The paper's Figures 2 and 3: noise images and the adversarial noise PGD finds from them.

  python -m tools.figures --workdir=runs/mnist5k_plain
  python -m tools.figures --workdir=runs/mnist5k_plain,runs/mnist5k_ceda,runs/mnist5k_acet \
      --out=/tmp/adversarial_noise.png

The noise and the attack are the evaluation's (predictions_lib.generated_sets: the noise is half
permuted test images, half uniform, low-passed and rescaled; PGD on the max log-confidence), with
eps 0.3 and 40 steps of 0.0075 as in the paper's figure. The top row shows the noise with every
model's prediction under it; then one row per model with the adversarial noise found against that
model and its prediction (one model: the paper's Figure 2; plain, CEDA and ACET: Figure 3).
"""

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.evaluation import predictions as predictions_lib


@dataclasses.dataclass
class ModelRow:
  """One model's part of the figure; arrays over the figure's N columns."""

  method: str  # 'plain', 'ceda' or 'acet' (the run's config.method).
  label: str  # e.g. 'acet (m5k_acet, step 248)'.
  noise: predictions_lib.Predictions  # The model's predictions on the shared noise images.
  adversarial: np.ndarray  # float32 [N, H, W, C] in [0, 1]: PGD's result against this model.
  adversarial_pred: predictions_lib.Predictions


def noise_images(config, num_images):
  """The first `num_images` evaluation noise images of `config`'s test set.

  Returns:
    (noise float32 [N, H, W, C] in [0, 1], labels int32 [N] of the source test images).
  """
  test = input_pipeline.eval_dataset(
    config.dataset,
    'test',
    num_images,
    data_dir=config.data_dir or None,
    max_examples=num_images,
    options=input_pipeline.options_from_config(config),
  )
  noise, labels = predictions_lib.generated_sets(test, config.seed, config.noise).noise[0]
  return noise, labels


def model_row(model, method, label, noise, labels, *, eps, step_size, steps, seed):
  """Predictions of `model` on `noise` and on the adversarial noise PGD finds from it.

  Args:
    model: Keras model, images float32 [N, H, W, C] in [0, 1] -> logits [N, K].
    method: the model's training method; label: the row's longer name (logs, summary).
    noise, labels: float32 [N, H, W, C] in [0, 1] and int32 [N].
    eps, step_size, steps: the attack (max log-confidence, L-inf ball in [0, 1]).
    seed: the run's base seed (config.seed); the attack's random start uses the evaluation's
      adversarial-noise stream of it (predictions_lib.generated_sets).

  Returns:
    A ModelRow.
  """
  predict = predictions_lib.make_predict_fn(model)
  batch = [(noise, labels)]
  attack = predictions_lib.NoiseAttack(model, eps=eps, step_size=step_size, steps=steps)
  adversarial = predictions_lib.generated_sets(None, seed, None, attack, noise=batch).adv_noise
  return ModelRow(
    method=method,
    label=label,
    noise=predictions_lib.predict_batches(predict, batch),
    adversarial=adversarial[0][0].numpy(),
    adversarial_pred=predictions_lib.predict_batches(predict, adversarial),
  )


def _caption(class_names, predicted, confidence):
  return f'{class_names[predicted]}: {100 * confidence:.1f}%'


def _show(ax, image):
  image = np.clip(np.asarray(image), 0.0, 1.0)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest')
  else:
    ax.imshow(image, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])


def render(noise, rows, class_names, path, title='', dpi=80):
  """Writes the figure: a noise row with every model's predictions, then a row per model.

  Args:
    noise: float32 [N, H, W, C] in [0, 1].
    rows: list of ModelRow.
    class_names: names of the K classes.
    path: the PNG to write.
    title: optional line on top.
    dpi: resolution.
  """
  n = noise.shape[0]
  # Room for the noise row's captions: one line per model.
  fig = Figure(
    figsize=(1.25 * n + 1.4, 0.6 + 0.13 * len(rows) + 1.55 * (1 + len(rows))), layout='constrained'
  )
  axes = fig.subplots(1 + len(rows), n, squeeze=False)
  for i in range(n):
    _show(axes[0, i], noise[i])
    axes[0, i].set_xlabel(
      '\n'.join(
        (f'{r.method} ' if len(rows) > 1 else '')
        + _caption(class_names, r.noise.predicted[i], r.noise.confidence[i])
        for r in rows
      ),
      fontsize=7,
    )
  axes[0, 0].set_ylabel('noise', fontsize=8)
  for r, row in enumerate(rows, start=1):
    for i in range(n):
      _show(axes[r, i], row.adversarial[i])
      axes[r, i].set_xlabel(
        _caption(
          class_names, row.adversarial_pred.predicted[i], row.adversarial_pred.confidence[i]
        ),
        fontsize=7,
      )
    axes[r, 0].set_ylabel(f'{row.method}\nadv. noise', fontsize=8)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.savefig(path, dpi=dpi)
  return path


def make_figure(workdirs, out, *, num_images=8, eps=0.3, step_size=0.0075, steps=40):
  """Restores the model of each workdir, attacks shared noise images, writes the figure.

  Args:
    workdirs: training workdirs (runs.restore_model reads their config and latest checkpoint),
      all trained on the same dataset.
    out: the PNG path (its directory is created).
    num_images: columns.
    eps, step_size, steps: the PGD attack on the noise (the paper's figure: 0.3, 0.0075, 40).

  Returns:
    {'path': out, 'noise': float32 [N, H, W, C], 'rows': [ModelRow], 'summary': {label:
    {'noise_mmc', 'adv_noise_mmc'}}}.
  """
  if not workdirs:
    raise ValueError('make_figure needs at least one workdir.')
  if num_images <= 0:
    raise ValueError(f'num_images must be > 0, got {num_images}')
  noise = labels = first = None
  rows = []
  for workdir in workdirs:
    if not tf.io.gfile.exists(os.path.join(workdir, 'config.json')):
      raise FileNotFoundError(f'{workdir} has no config.json: not a training workdir.')
    model, config, info, step = runs.restore_model(workdir)
    if first is None:
      first = (config.dataset, info)
      noise, labels = noise_images(config, num_images)
    elif (config.dataset, info.image_shape) != (first[0], first[1].image_shape):
      raise ValueError(
        f'{workdir} was trained on {config.dataset} {info.image_shape}, but '
        f'{workdirs[0]} on {first[0]} {first[1].image_shape}: one dataset per figure.'
      )
    label = f'{config.method} ({os.path.basename(os.path.normpath(workdir))}, step {step})'
    rows.append(
      model_row(
        model,
        config.method,
        label,
        noise,
        labels,
        eps=eps,
        step_size=step_size,
        steps=steps,
        seed=config.seed,
      )
    )
  tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(out)))
  title = (
    f'{first[0]}: noise from the test set; adversarial noise = PGD on max confidence, '
    f'eps {eps:g}, {steps} steps of {step_size:g}'
  )
  render(noise.numpy(), rows, first[1].class_names, out, title)
  summary = {
    r.label: {
      'noise_mmc': float(r.noise.confidence.mean()),
      'adv_noise_mmc': float(r.adversarial_pred.confidence.mean()),
    }
    for r in rows
  }
  logging.info('Wrote %s: %s', out, summary)
  return {'path': out, 'noise': noise.numpy(), 'rows': rows, 'summary': summary}


def define_flags():
  """The binary's flags, defined when it runs (tests import this module beside acet_tf.evaluate,
  which has a --workdir of its own). --workdir takes one or more comma-separated workdirs."""
  flags.DEFINE_string('workdir', None, 'Training workdir(s), comma-separated; one row each.')
  flags.DEFINE_string('out', '', 'PNG path; default <first workdir>/adversarial_noise.png.')
  flags.DEFINE_integer('num_images', 8, 'Noise images (columns).')
  flags.DEFINE_float('eps', 0.3, 'L-inf radius of the attack (the paper: 0.3).')
  flags.DEFINE_integer('steps', 40, "PGD steps (the paper's figure: 40).")
  flags.DEFINE_float('step_size', 0.0075, 'PGD step size (the paper: 0.0075).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  workdirs = [w for w in (f.workdir or '').split(',') if w]
  if not workdirs:
    raise app.UsageError('--workdir is required (one or more, comma-separated).')
  out = f.out or os.path.join(workdirs[0], 'adversarial_noise.png')
  result = make_figure(
    workdirs, out, num_images=f.num_images, eps=f.eps, step_size=f.step_size, steps=f.steps
  )
  print(result['path'])
  for label, numbers in result['summary'].items():
    print(
      f'{label}: mean confidence on noise {numbers["noise_mmc"]:.3f}, '
      f'on adversarial noise {numbers["adv_noise_mmc"]:.3f}'
    )


if __name__ == '__main__':
  define_flags()
  app.run(main)
