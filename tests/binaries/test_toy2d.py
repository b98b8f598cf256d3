"""tools/toy2d.py: the numbers behind the two-moons pictures, on a short run of plain and ACET."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tools import toy2d

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def result(tmp_path_factory):
  # 1000 steps: ACET has left the uniform-output plateau of its first few hundred steps.
  return toy2d.run(str(tmp_path_factory.mktemp('toy2d')), 'steps=1000', methods=('plain', 'acet'))


def test_writes_the_four_pngs(result):
  assert set(result['files']) == {'confidence', 'confidence_far', 'linear_regions', 'rays'}
  for path in result['files'].values():
    with open(path, 'rb') as f:
      head = f.read()
    assert head.startswith(PNG_MAGIC), path
    assert len(head) > 5000, path  # Pictures, not empty canvases.


def test_acet_is_less_confident_than_plain_away_from_the_data(result):
  s = result['summary']
  assert s['plain']['mmc_box_far'] > 0.8  # The phenomenon: plain is sure where there is no data.
  assert s['acet']['mmc_box_far'] < s['plain']['mmc_box_far'] - 0.2
  assert s['acet']['mmc_box_far'] < 0.6  # Close to the uniform 1/2.
  assert s['acet']['mmc_data'] > 0.8  # ...without giving up confidence on the data.
  assert result['train']['acet']['error'] < 0.1


def test_linear_regions_are_finitely_many_and_affine(result):
  model = result['models']['plain']
  resolution = 60
  points = toy2d.grid(0.0, 1.0, resolution)
  ids = toy2d.activation_patterns(model, points)
  num_regions = ids.max() + 1
  assert 1 < num_regions < resolution**2  # Several regions, most wider than one grid cell.
  assert set(np.unique(ids)) == set(range(num_regions))
  # On each region the network is one affine map: a least-squares affine fit is exact.
  sizes = np.bincount(ids)
  maps = []
  for region in np.argsort(sizes)[::-1][:5]:
    x = points[ids == region].astype(np.float64)
    assert len(x) >= 3
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    z = toy2d.logits_of(model, x)
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    np.testing.assert_allclose(design @ coef, z, atol=1e-4 * (1 + np.abs(z).max()))
    maps.append(coef)
  # ...and a different one on different regions.
  assert np.abs(maps[0] - maps[1]).max() > 1e-3


def test_plain_confidence_grows_along_rays(result):
  model = result['models']['plain']
  directions = toy2d.ray_directions(8, seed=3)
  alphas = toy2d.ALPHAS
  conf = toy2d.ray_confidence(model, directions, alphas)
  assert conf.shape == (8, len(alphas))
  large = alphas >= 1e3
  assert np.all(np.diff(conf[:, large], axis=1) >= -1e-12)
  assert np.all(conf[:, -1] > 0.999)  # Theorem 3.1: it tends to 1.
  # The softmax saturates in floating point; the logit gap behind it keeps growing, linearly in
  # alpha once the ray is in its last (unbounded) linear region.
  points = (alphas[None, large, None] * directions[:, None, :]).reshape(-1, 2)
  z = np.sort(toy2d.logits_of(model, points), axis=1)
  gap = (z[:, -1] - z[:, -2]).reshape(len(directions), -1)
  assert np.all(np.diff(gap, axis=1) > 0)
  alpha_large = alphas[large]
  half = np.argmin(np.abs(alpha_large - alpha_large[-1] / 2))
  ratio = gap[:, -1] / gap[:, half]
  np.testing.assert_allclose(ratio, alpha_large[-1] / alpha_large[half], rtol=0.05)


def test_ray_confidence_matches_the_model():
  keras.utils.set_random_seed(0)
  model = toy2d.mlp((8,))
  directions = np.array([[0.2, 0.9]], np.float32)
  alphas = np.array([1.0, 10.0])
  conf = toy2d.ray_confidence(model, directions, alphas)
  expected = tf.reduce_max(
    tf.nn.softmax(model(np.array([[0.2, 0.9], [2.0, 9.0]], np.float32))), axis=1
  ).numpy()
  np.testing.assert_allclose(conf[0], expected, rtol=1e-5)


def test_uniform_box_noise_fills_the_box_and_follows_the_seed():
  points = tf.zeros([500, 2])
  a = toy2d.uniform_box_noise(points, tf.constant([1, 2], tf.int64)).numpy()
  b = toy2d.uniform_box_noise(points, tf.constant([1, 2], tf.int64)).numpy()
  c = toy2d.uniform_box_noise(points, tf.constant([1, 3], tf.int64)).numpy()
  assert a.shape == (500, 2)
  assert a.min() >= 0.0 and a.max() < 1.0
  assert a.min() < 0.05 and a.max() > 0.95  # The whole box, not a corner.
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 0.1


def test_two_moons_lie_inside_the_box_and_are_balanced():
  points, labels = toy2d.two_moons(400, 0.08, seed=0)
  assert points.shape == (400, 2) and points.dtype == np.float32
  assert points.min() > 0.1 and points.max() < 0.9  # A margin of empty box around the data.
  assert np.bincount(labels).tolist() == [200, 200]
  # The upper moon (class 0) sits higher on average than the lower one.
  assert points[labels == 0, 1].mean() > points[labels == 1, 1].mean() + 0.05
  np.testing.assert_array_equal(points, toy2d.two_moons(400, 0.08, seed=0)[0])


def test_far_from_data():
  data = np.array([[0.5, 0.5]], np.float32)
  points = np.array([[0.5, 0.55], [0.5, 0.7], [0.0, 0.0]], np.float32)
  assert toy2d.far_from_data(points, data, margin=0.1).tolist() == [False, True, True]


def test_get_config_follows_the_method_and_refuses_unknown_keys():
  plain, acet = toy2d.get_config('plain'), toy2d.get_config('acet,steps=7')
  assert plain.noise.ratio == 0 and plain.pgd.steps == 0
  assert acet.noise.ratio == 1 and acet.pgd.steps > 0 and acet.num_train_steps == 7
  with pytest.raises(ValueError, match='Unknown config argument'):
    toy2d.get_config('acet,epochs=3')
  with pytest.raises(ValueError, match='steps must be > 0'):
    toy2d.get_config('acet,steps=0')
  bad = toy2d.get_config('plain')
  bad.model = 'lenet'
  with pytest.raises(ValueError, match='toy2d trains mlp'):
    toy2d.train(bad)


def test_activation_patterns_needs_hidden_layers():
  inputs = keras.Input((2,))
  model = keras.Model(inputs, keras.layers.Dense(2, name='logits')(inputs))
  with pytest.raises(ValueError, match='hidden_'):
    toy2d.activation_patterns(model, np.zeros((3, 2), np.float32))
