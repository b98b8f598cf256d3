"""The evaluation's pictures: confidence histograms, ROC curves, an image grid with predictions.

Matplotlib with the Agg canvas (no display, no pyplot state). Every function takes numpy arrays,
returns the matplotlib Figure and, given `path`, writes it there as a PNG.
"""

import math

from matplotlib import figure as mpl_figure
from matplotlib import ticker
from matplotlib.backends import backend_agg
import numpy as np

from acet_tf.evaluation import ood_metrics

HISTOGRAM_BINS = 100  # Over [0, 1], as the reference's plots.


def _new_figure(width, height):
  fig = mpl_figure.Figure(figsize=(width, height), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _save(fig, path):
  if path:
    fig.savefig(path, format='png', bbox_inches='tight')
  return fig


def confidence_histograms(confidences, path=None, *, title='', num_classes=None, cols=4):
  """One histogram of max-softmax confidences per set, counts on a log scale (paper's Figure 4).

  Args:
    confidences: {set title: float [N] in [0, 1]}, in display order (first: the test set).
    path: PNG to write, or None.
    title: figure title.
    num_classes: K; draws the floor 1/K of the confidence as a dotted line when given.
    cols: panels per row.

  Returns:
    The Figure, one Axes per set with HISTOGRAM_BINS bins over [0, 1] and a log y-axis.
  """
  if not confidences:
    raise ValueError('confidence_histograms needs at least one set.')
  rows = math.ceil(len(confidences) / cols)
  fig = _new_figure(3.2 * min(cols, len(confidences)), 2.6 * rows)
  for i, (name, conf) in enumerate(confidences.items()):
    conf = np.asarray(conf, np.float64)
    ax = fig.add_subplot(rows, min(cols, len(confidences)), i + 1)
    ax.hist(conf, bins=HISTOGRAM_BINS, range=(0.0, 1.0), log=True, color=f'C{i % 10}')
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.8)
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if num_classes:
      ax.axvline(1.0 / num_classes, color='grey', linestyle=':', linewidth=1)
    ax.set_title(f'{name} (N={conf.size}, MMC {conf.mean():.3f})', fontsize=9)
    ax.set_xlabel('confidence (max softmax)', fontsize=8)
    ax.tick_params(labelsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def roc_curves(in_confidences, out_confidences, path=None, *, title=''):
  """ROC curves of test set (positive) vs each out-set (negative) by confidence, in one plot.

  Args:
    in_confidences: float [N] confidences of the in-distribution test set.
    out_confidences: {set title: float [M]}.
    path: PNG to write, or None.
    title: figure title.

  Returns:
    The Figure: one line per out-set (the exact ood_metrics.roc_curve), labelled with its AUROC, and
    the chance diagonal.
  """
  if not out_confidences:
    raise ValueError('roc_curves needs at least one out-set.')
  fig = _new_figure(5.5, 5.0)
  ax = fig.add_subplot(1, 1, 1)
  for i, (name, conf) in enumerate(out_confidences.items()):
    fpr, tpr = ood_metrics.roc_curve(in_confidences, conf)
    auc = ood_metrics.auroc(in_confidences, conf)
    # C0 is the test set's colour in confidence_histograms: out-set i gets the same colour there.
    ax.plot(fpr, tpr, color=f'C{(i + 1) % 10}', linewidth=2, label=f'{name} (AUROC {auc:.3f})')
  ax.plot([0, 1], [0, 1], color='grey', linestyle=':', linewidth=1)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel('false positive rate (out-set accepted)')
  ax.set_ylabel('true positive rate (test set accepted)')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right', fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def image_grid(rows, class_names, path=None, *, title=''):
  """A grid of images with the predicted class and confidence under each (paper's Figures 2-3).

  Args:
    rows: {row title: (images float [n, H, W, C] in [0, 1], predicted int [n], confidence float
      [n])} or, with true labels (drawn as "true y"), a 4-tuple ending in labels int [n].
    class_names: names of the K classes.
    path: PNG to write, or None.
    title: figure title.

  Returns:
    The Figure: len(rows) x max n image Axes, each titled "<class> <confidence>".
  """
  if not rows:
    raise ValueError('image_grid needs at least one row.')
  cols = max(len(r[0]) for r in rows.values())
  if cols == 0:
    raise ValueError('image_grid got rows without images.')
  fig = _new_figure(1.35 * cols + 1.2, 1.75 * len(rows))
  for r, (row_title, row) in enumerate(rows.items()):
    images, predicted, confidence = row[:3]
    labels = row[3] if len(row) > 3 else None
    for c in range(cols):
      ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(row_title, fontsize=8)
      if c >= len(images):
        ax.axis('off')
        continue
      image = np.clip(np.asarray(images[c], np.float32), 0.0, 1.0)
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap='gray', vmin=0.0, vmax=1.0)
      else:
        ax.imshow(image)
      text = f'{class_names[int(predicted[c])]} {float(confidence[c]):.2f}'
      if labels is not None:
        text += f'\ntrue {class_names[int(labels[c])]}'
      ax.set_title(text, fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)
