"""The evaluation plots: what each figure holds, and that the PNGs are written."""

import numpy as np
import pytest
import tensorflow as tf

from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _read_png(path):
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC)
  return tf.io.decode_png(data).numpy()


def test_confidence_histograms_count_every_point_on_a_log_axis(tmp_path):
  rng = np.random.default_rng(0)
  sets = {
    'test': rng.uniform(0.9, 1.0, 50),
    'noise': rng.uniform(0.1, 0.6, 30),
    'adv': np.array([0.1, 1.0, 1.0]),
  }  # 1.0 is the right edge: it must still be counted.
  path = tmp_path / 'hist.png'
  fig = plots.confidence_histograms(sets, str(path), title='t', num_classes=10, cols=2)
  axes = fig.get_axes()
  assert len(axes) == 3
  for ax, (name, conf) in zip(axes, sets.items()):
    assert ax.get_yscale() == 'log'
    assert len(ax.patches) == plots.HISTOGRAM_BINS
    assert sum(p.get_height() for p in ax.patches) == len(conf)
    assert name in ax.get_title() and f'N={len(conf)}' in ax.get_title()
    assert f'MMC {np.mean(conf):.3f}' in ax.get_title()
  image = _read_png(path)
  assert image.shape[0] > 100 and image.shape[1] > 100


def test_roc_curves_are_the_exact_curves_with_their_auroc(tmp_path):
  rng = np.random.default_rng(1)
  in_conf = rng.uniform(0.5, 1.0, 40)
  out = {'near': rng.uniform(0.4, 0.9, 25), 'far': np.full(10, 0.2)}
  path = tmp_path / 'roc.png'
  fig = plots.roc_curves(in_conf, out, str(path))
  lines = fig.get_axes()[0].get_lines()
  assert len(lines) == 3  # Two curves and the chance diagonal.
  for i, (line, (name, conf)) in enumerate(zip(lines, out.items())):
    fpr, tpr = ood_metrics.roc_curve(in_conf, conf)
    np.testing.assert_array_equal(line.get_xdata(), fpr)
    np.testing.assert_array_equal(line.get_ydata(), tpr)
    assert line.get_label() == f'{name} (AUROC {ood_metrics.auroc(in_conf, conf):.3f})'
    assert line.get_color() == f'C{i + 1}'  # The out-set's colour in the histograms.
  _read_png(path)


def test_image_grid_titles_every_image_with_class_and_confidence(tmp_path):
  names = tuple('abcdefghij')
  grey = np.random.default_rng(2).uniform(size=(3, 8, 8, 1)).astype(np.float32)
  rows = {
    'noise': (grey, np.array([0, 1, 2]), np.array([0.5, 0.25, 0.125])),
    'adv': (grey[:2], np.array([9, 3]), np.array([0.99, 0.75]), np.array([4, 3])),
  }
  path = tmp_path / 'grid.png'
  fig = plots.image_grid(rows, names, str(path))
  axes = fig.get_axes()
  assert len(axes) == 2 * 3
  titles = [ax.get_title() for ax in axes]
  assert titles[:3] == ['a 0.50', 'b 0.25', 'c 0.12']
  assert titles[3:5] == ['j 0.99\ntrue e', 'd 0.75\ntrue d']
  assert not axes[5].axison  # The short row's missing image is left blank.
  assert axes[0].get_ylabel() == 'noise' and axes[3].get_ylabel() == 'adv'
  # The image is shown as is (grey, [0, 1]).
  np.testing.assert_allclose(axes[0].get_images()[0].get_array(), grey[0, ..., 0])
  _read_png(path)


def test_rgb_images_and_no_file_without_a_path(tmp_path):
  rgb = np.ones((1, 4, 4, 3), np.float32) * 0.5
  fig = plots.image_grid({'x': (rgb, [0], [1.0])}, ('zero',))
  assert fig.get_axes()[0].get_images()[0].get_array().shape == (4, 4, 3)
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
  'call',
  [
    lambda: plots.confidence_histograms({}),
    lambda: plots.roc_curves([0.5], {}),
    lambda: plots.image_grid({}, ('a',)),
    lambda: plots.image_grid({'x': (np.zeros((0, 2, 2, 1)), [], [])}, ('a',)),
  ],
)
def test_empty_input_is_an_error(call):
  with pytest.raises(ValueError):
    call()
