"""IBP: exact on one affine layer (plus ReLU), sound at eps > 0 against sampled and attacked points
on deeper nets (LeNet, the small pre-activation ResNet with its pad shortcut, a conv-shortcut
ResNet), with batch norm of negative gamma and non-trivial moving statistics, and informative: the
networks are scaled so that the bound at the tested radius is well below 1.

Each test here fails for at least one of the mutations tools/mutation_check.py applies to ibp.py.
"""

import hypothesis
from hypothesis import strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

from acet_tf import models as models_lib
from acet_tf.models import resnet
from acet_tf.ops import pgd
from acet_tf.robustness import apgd
from acet_tf.robustness import ibp
from tests import support

SEED = tf.constant([3, 4], tf.int64)
TOL = 1e-5  # float32 round-off of the bound, relative to the logit scale.
# Fixed examples (derandomize, no database) so a run is repeatable; no shrinking, so a failure
# (tools/mutation_check.py makes them on purpose) reports its first failing example in seconds.
HYPOTHESIS = hypothesis.settings(
  max_examples=15,
  deadline=None,
  derandomize=True,
  database=None,
  phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
)


def randomise_batch_norm(model, seed):
  """Moving statistics far from (0, 1) and gammas of both signs (half of them negative)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0, 0.5, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype(np.float32))
      sign = np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
      layer.gamma.assign((sign * rng.uniform(0.5, 1.5, n)).astype(np.float32))
      layer.beta.assign(rng.normal(0, 0.3, n).astype(np.float32))
  return model


def informative(model, x, eps, max_difference=3.0):
  """Rescales the logit layer so that IBP's logit differences at eps are at most `max_difference`.

  Scaling the logits scales their intervals and differences alike, so IBP's tightness does not
  change; the confidence bound at eps becomes at most 1 / (1 + (K - 1) exp(-max_difference))
  (0.69 for K = 10) instead of saturating at 1 on an untrained net.
  """
  upper = ibp.logit_difference_upper(model, *ibp.input_box(x, eps))
  factor = max_difference / float(tf.reduce_max(upper))
  final = model.layers[-1]
  final.kernel.assign(final.kernel * factor)
  if final.use_bias:
    final.bias.assign(final.bias * factor)
  return model


def conv_shortcut_resnet(input_shape, num_classes):
  """Conv-BN-ReLU, max-pool, a unit with a 1x1 conv shortcut and Add, GAP, dense."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Conv2D(8, 3, padding='same', use_bias=False)(inputs)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.MaxPooling2D(2)(x)
  y = keras.layers.Conv2D(12, 3, strides=2, padding='same')(x)
  y = keras.layers.BatchNormalization()(y)
  s = keras.layers.Conv2D(12, 1, strides=2, padding='same')(x)
  x = keras.layers.ReLU()(keras.layers.Add()([y, s]))
  x = keras.layers.AveragePooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, activation='relu')(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def mlp_bn(input_shape, num_classes):
  """Dense-ReLU, dense-BN-ReLU, dense: small enough that IBP is within a few times the truth."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Dense(12, activation='relu')(keras.layers.Flatten()(inputs))
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Dense(12)(x)))
  return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


EPS = 0.01  # The radius of the soundness tests on the deeper nets.


def models():
  keras.utils.set_random_seed(0)
  x = lambda shape: tf.random.stateless_uniform([8, *shape], seed=[5, 6])
  lenet = models_lib.create_model('lenet', (12, 12, 1), 10)
  yield 'lenet', informative(lenet, x((12, 12, 1)), EPS), (12, 12, 1)
  preact = randomise_batch_norm(
    resnet.preact_resnet((16, 16, 3), 10, filters=(4, 8, 8), units_per_stage=1), 1
  )
  yield 'preact_resnet', informative(preact, x((16, 16, 3)), EPS), (16, 16, 3)
  conv = randomise_batch_norm(conv_shortcut_resnet((16, 16, 3), 5), 2)
  yield 'conv_shortcut', informative(conv, x((16, 16, 3)), EPS), (16, 16, 3)
  mlp = randomise_batch_norm(mlp_bn((4, 4, 1), 6), 3)
  yield 'mlp_bn', informative(mlp, x((4, 4, 1)), EPS), (4, 4, 1)


MODELS = list(models())
MODEL_IDS = [m[0] for m in MODELS]
MIN_SPREAD = {'lenet': 2e-4, 'preact_resnet': 2e-4, 'conv_shortcut': 0.02, 'mlp_bn': 0.1}


def confidence(model, u):
  return tf.reduce_max(tf.nn.softmax(model(u, training=False)), axis=1).numpy()


# --------------------------------------------------------------------------------------------------
# One affine layer (convolution + batch norm, or dense), then ReLU: IBP's interval is exact.
# --------------------------------------------------------------------------------------------------


def _conv_bn(relu_layer):
  inputs = keras.Input((6, 6, 2))
  pre = keras.layers.BatchNormalization(epsilon=1e-3)(keras.layers.Conv2D(3, 3, strides=1)(inputs))
  out = keras.layers.ReLU()(pre) if relu_layer else keras.layers.Activation('relu')(pre)
  return keras.Model(inputs, pre), keras.Model(inputs, out)


def _dense():
  inputs = keras.Input((6, 6, 2))
  flat = keras.layers.Flatten()(inputs)
  dense = keras.layers.Dense(5)
  pre = dense(flat)
  return keras.Model(inputs, pre), keras.Model(inputs, keras.layers.ReLU()(pre))


AFFINE = {'conv_bn_relu_layer': _conv_bn(True), 'conv_bn_relu_act': _conv_bn(False)}
AFFINE['dense_relu'] = _dense()


def _randomise_weights(model, rng):
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(0, 1, n).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.1, 4.0, n).astype(np.float32))
      sign = rng.choice([-1.0, 1.0], n)
      sign[0] = -1.0  # At least one negative gamma in every example.
      layer.gamma.assign((sign * rng.uniform(0.2, 2.0, n)).astype(np.float32))
      layer.beta.assign(rng.normal(0, 1, n).astype(np.float32))
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
      layer.kernel.assign(rng.normal(0, 0.5, layer.kernel.shape).astype(np.float32))
      if layer.use_bias:
        layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape).astype(np.float32))


def assert_encloses(got_lo, got_hi, want_lo, want_hi, scale):
  """[got] contains [want] (up to the float32 centre of the reference) and is no wider than
  IBP's round-off widening (measured up to 6e-5 of the scale)."""
  slack = 1e-6 * scale
  assert np.all(got_lo <= want_lo + slack) and np.all(got_hi >= want_hi - slack)
  np.testing.assert_allclose(got_lo, want_lo, atol=2e-4 * scale)
  np.testing.assert_allclose(got_hi, want_hi, atol=2e-4 * scale)


def _exact_affine_interval(pre_model, lo, hi):
  """(lower, upper) of an affine model over the box: A c -/+ |A| r, A its Jacobian."""
  c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
  c64 = tf.constant(c, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(c64)
    out = pre_model(c64, training=False)
  jac = tape.jacobian(out, c64).numpy().astype(np.float64)  # [B, *out, B, *in]
  b = c.shape[0]
  jac = jac.reshape(b, -1, b, c[0].size)[np.arange(b), :, np.arange(b), :]  # [B, out, in]
  centre = out.numpy().reshape(b, -1).astype(np.float64)
  rad = np.einsum('boi,bi->bo', np.abs(jac), r.reshape(b, -1).astype(np.float64))
  return (centre - rad).reshape(out.shape), (centre + rad).reshape(out.shape)


@HYPOTHESIS
@hypothesis.given(
  kind=st.sampled_from(sorted(AFFINE)),
  seed=st.integers(0, 2**31 - 1),
  eps=st.floats(1e-2, 0.5),
)
def test_interval_of_one_affine_layer_and_relu_is_exact(kind, seed, eps):
  """Per unit, max and min of an affine map over a box are attained at corners; ReLU is monotone."""
  pre_model, model = AFFINE[kind]
  rng = np.random.default_rng(seed)
  _randomise_weights(pre_model, rng)
  x = rng.uniform(0, 1, (3, 6, 6, 2)).astype(np.float32)
  lo, hi = (v.numpy() for v in ibp.input_box(x, eps))
  pre_lo, pre_hi = _exact_affine_interval(pre_model, lo, hi)
  scale = 1.0 + np.abs(pre_hi).max()
  for m, (want_lo, want_hi) in (
    (model, (np.maximum(pre_lo, 0.0), np.maximum(pre_hi, 0.0))),
    (pre_model, (pre_lo, pre_hi)),  # Without the ReLU: the pre-activation is the model output.
  ):
    got_lo, got_hi = (v.numpy() for v in ibp.logit_bounds(m, lo, hi))
    assert_encloses(got_lo, got_hi, want_lo, want_hi, scale)


DENSE_HEAD = _dense()[0]


@HYPOTHESIS
@hypothesis.given(seed=st.integers(0, 2**31 - 1), eps=st.floats(1e-2, 0.5))
def test_logit_differences_of_one_dense_layer_are_exact(seed, eps):
  """U_kj = max over the box of (w_k - w_j) . u + b_k - b_j = (w_k - w_j) . c + |w_k - w_j| . r."""
  rng = np.random.default_rng(seed)
  _randomise_weights(DENSE_HEAD, rng)
  x = rng.uniform(0, 1, (4, 6, 6, 2)).astype(np.float32)
  lo, hi = (v.numpy().reshape(4, -1).astype(np.float64) for v in ibp.input_box(x, eps))
  w = DENSE_HEAD.layers[-1].kernel.numpy().astype(np.float64)
  b = DENSE_HEAD.layers[-1].bias.numpy().astype(np.float64)
  diff_w = w[:, :, None] - w[:, None, :]  # [D, K, K]
  exact = np.einsum('bd,dkj->bkj', (lo + hi) / 2, diff_w) + (b[:, None] - b[None, :])
  exact += np.einsum('bd,dkj->bkj', (hi - lo) / 2, np.abs(diff_w))
  got = ibp.logit_difference_upper(DENSE_HEAD, *ibp.input_box(x, eps)).numpy()
  scale = 1.0 + np.abs(exact).max()
  assert np.all(got >= exact - 1e-6 * scale)
  np.testing.assert_allclose(got, exact, atol=2e-4 * scale)


# --------------------------------------------------------------------------------------------------
# Deeper nets: sound at eps > 0 against sampled and attacked points, and informative.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name,model,shape', MODELS, ids=MODEL_IDS)
def test_bound_at_eps_zero_is_the_forward_pass(name, model, shape):
  x = tf.random.stateless_uniform([8, *shape], seed=[1, 2])
  conf = tf.reduce_max(tf.nn.softmax(model(x, training=False)), axis=1).numpy()
  bound = ibp.confidence_upper_bound(model, x, 0.0).numpy()
  # Above the forward pass by the round-off widening only (0.4% on preact_resnet, measured).
  assert np.all(bound >= conf) and np.all(bound <= conf * 1.01), (bound, conf)
  lo, hi = (v.numpy() for v in ibp.logit_bounds(model, x, x))
  z = model(x, training=False).numpy()
  assert np.all(lo <= z) and np.all(z <= hi)
  # The widening scales with the hidden units' magnitudes, not the logits' (which the nets here
  # shrink): below 1% of the interval at the tested radius.
  wide_lo, wide_hi = (v.numpy() for v in ibp.logit_bounds(model, *ibp.input_box(x, EPS)))
  assert np.all(hi - lo <= 0.01 * (wide_hi - wide_lo)), np.max((hi - lo) / (wide_hi - wide_lo))


def attacked_logits(model, x, eps, steps=10):
  """Per logit k, PGD maximising z_k and PGD minimising z_k: the logits [2K, B, K] they reach."""
  b, k = x.shape[0], model.output_shape[-1]
  reps = 2 * k
  xs = tf.tile(x, [reps] + [1] * (len(x.shape) - 1))  # Copy j of the batch attacks logit j // 2.
  which = tf.repeat(tf.range(reps) // 2, b)
  sign = tf.repeat(tf.where(tf.range(reps) % 2 == 0, 1.0, -1.0), b)
  objective = lambda logits, _: sign * tf.gather(logits, which, batch_dims=1)
  logits_fn = lambda u: model(u, training=False)
  u, _ = pgd.pgd(logits_fn, xs, objective, eps=eps, step_size=eps / 4, steps=steps, seed=SEED)
  return tf.reshape(logits_fn(u), [reps, b, k]).numpy()


@pytest.mark.parametrize('name,model,shape', MODELS, ids=MODEL_IDS)
def test_logit_intervals_contain_sampled_and_attacked_points(name, model, shape):
  x = tf.random.stateless_uniform([4, *shape], seed=[5, 6])
  lo, hi = (v.numpy() for v in ibp.logit_bounds(model, *ibp.input_box(x, EPS)))
  upper = ibp.logit_difference_upper(model, *ibp.input_box(x, EPS)).numpy()
  reached = [model(u, training=False).numpy() for u in support.box_points(x, EPS, 6, 9)]
  reached = np.concatenate([np.stack(reached), attacked_logits(model, x, EPS)])  # [P, B, K]
  tol = TOL * (1.0 + np.abs(hi).max())
  assert np.all(lo <= hi)
  assert np.all(reached >= lo[None] - tol), (reached.min(axis=0) - lo).min()
  assert np.all(reached <= hi[None] + tol), (reached.max(axis=0) - hi).max()
  diffs = reached[:, :, :, None] - reached[:, :, None, :]  # z_k - z_j at every point.
  assert np.all(diffs <= upper[None] + tol), (diffs.max(axis=0) - upper).max()
  # The attacks span this fraction of the interval (median over logits): IBP on untrained deep
  # nets is loose by orders of magnitude, so the small nets and the exact tests above carry the
  # tightness checks; this records how far apart truth and bound are here.
  spread = reached.max(axis=0) - reached.min(axis=0)
  assert np.median(spread / (hi - lo)) > MIN_SPREAD[name]


@pytest.mark.parametrize('eps', [3e-5, EPS])
@pytest.mark.parametrize('name,model,shape', MODELS, ids=MODEL_IDS)
def test_bound_is_above_every_iterate_of_every_attack(name, model, shape, eps):
  x = tf.random.stateless_uniform([8, *shape], seed=[5, 6])
  bound = ibp.confidence_upper_bound(model, x, eps).numpy()
  lo, hi = ibp.input_box(x, eps)
  logits_fn = lambda u: model(u, training=False)
  objective = pgd.max_log_confidence_objective
  reached = [confidence(model, x)]
  # Every iterate of a sign-gradient ascent with a large step (it visits the corners of the box).
  u = x
  for _ in range(15):
    with tf.GradientTape() as tape:
      tape.watch(u)
      obj = objective(logits_fn(u), None)
    u = tf.clip_by_value(u + eps / 3 * tf.sign(tape.gradient(obj, u)), lo, hi)
    reached.append(confidence(model, u))
  for steps in (1, 5, 20):
    reached.append(
      confidence(
        model,
        pgd.pgd(logits_fn, x, objective, eps=eps, step_size=eps / 4, steps=steps, seed=SEED)[0],
      )
    )
    reached.append(
      confidence(model, apgd.apgd(logits_fn, x, objective, eps=eps, steps=steps, seed=SEED)[0])
    )
  reached.extend(confidence(model, u) for u in support.box_points(x, eps, 6, 9))
  reached = np.stack(reached)
  assert np.all(reached <= bound[None] + TOL), (reached.max(axis=0), bound)
  # Informative: well below 1 at the tested radius (the nets are scaled for it).
  assert np.all(bound < 0.95), bound
  assert np.all(bound >= reached.max(axis=0) - TOL)


def test_bound_grows_with_eps_and_logit_bounds_contain_the_forward_pass():
  _, model, shape = MODELS[1]
  x = tf.random.stateless_uniform([8, *shape], seed=[7, 8])
  bounds = [ibp.confidence_upper_bound(model, x, e).numpy() for e in (0.0, 0.01, 0.1)]
  assert np.all(bounds[1] >= bounds[0] - TOL) and np.all(bounds[2] >= bounds[1] - TOL)
  lo, hi = ibp.logit_bounds(model, *ibp.input_box(x, 0.1))
  z = model(x, training=False).numpy()
  assert np.all(lo.numpy() <= z + TOL) and np.all(z <= hi.numpy() + TOL)


def test_unsupported_layer_is_named():
  inputs = keras.Input((4,))
  model = keras.Model(
    inputs, keras.layers.Dense(3)(keras.layers.Dense(4, activation='tanh')(inputs))
  )
  with pytest.raises(ValueError, match='tanh'):
    ibp.confidence_upper_bound(model, tf.zeros([2, 4]), 0.1)


def test_padding_with_zeros_is_bounded_and_other_values_are_refused():
  inputs = keras.Input((4, 4, 2))
  padded = keras.layers.ZeroPadding2D(1)(keras.ops.pad(inputs, [[0, 0], [0, 0], [0, 0], [1, 1]]))
  model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(padded)))
  x = tf.random.stateless_uniform([2, 4, 4, 2], seed=[1, 1])
  bound, conf = ibp.confidence_upper_bound(model, x, 0.0).numpy(), confidence(model, x)
  assert np.all(bound >= conf) and np.all(bound <= conf * (1 + 1e-4))
  for value, mode in ((1.0, 'constant'), (0, 'reflect')):
    inputs = keras.Input((4, 4, 2))
    kw = dict(constant_values=value) if mode == 'constant' else {}
    pad = keras.ops.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]], mode=mode, **kw)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(pad)))
    with pytest.raises(ValueError, match='only zeros'):
      ibp.confidence_upper_bound(model, x, 0.1)


def float64_copy(name, model):
  """The same network in float64 (the reference the float32 bound must contain)."""
  keras.config.set_floatx('float64')
  try:
    keras.utils.set_random_seed(0)
    twin = {
      'preact_resnet': lambda: resnet.preact_resnet(
        (16, 16, 3), 10, filters=(4, 8, 8), units_per_stage=1
      ),
      'conv_shortcut': lambda: conv_shortcut_resnet((16, 16, 3), 5),
    }[name]()
  finally:
    keras.config.set_floatx('float32')
  twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
  return twin


@pytest.mark.parametrize('name', ['preact_resnet', 'conv_shortcut'])
def test_bounds_at_tiny_eps_contain_float64_and_float32_logits_without_tolerance(name):
  """At eps 1e-6 float32 round-off is not small next to the interval. (These nets are too shallow
  for the bounds without outward rounding to fail here; the one-layer test below does fail.)"""
  model = dict((m[0], m[1]) for m in MODELS)[name]
  twin = float64_copy(name, model)
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[3, 3])
  eps = 1e-6
  lo, hi = (v.numpy().astype(np.float64) for v in ibp.logit_bounds(model, *ibp.input_box(x, eps)))
  upper = ibp.logit_difference_upper(model, *ibp.input_box(x, eps)).numpy().astype(np.float64)
  bound = ibp.confidence_upper_bound(model, x, eps).numpy().astype(np.float64)
  box_lo, box_hi = (np.maximum(x.numpy() - eps, 0.0), np.minimum(x.numpy() + eps, 1.0))
  points = [x.numpy()] + [u.numpy() for u in support.box_points(x, eps, 6, 9)]
  for u in points:
    for z in (
      twin(u.astype(np.float64), training=False).numpy(),
      model(np.clip(u, box_lo, box_hi), training=False).numpy().astype(np.float64),
    ):
      assert np.all(lo <= z) and np.all(z <= hi), (np.min(z - lo), np.min(hi - z))
      assert np.all(z[:, :, None] - z[:, None, :] <= upper)
      e = np.exp(z - z.max(axis=1, keepdims=True))
      assert np.all((e / e.sum(axis=1, keepdims=True)).max(axis=1) <= bound)


@pytest.mark.parametrize('eps', [0.0, 1e-7])
def test_one_dense_layer_contains_its_exact_value_without_tolerance(eps):
  """Without outward rounding the interval at eps 0 is the float32 value alone, which misses the
  exact one (float64 from the same float32 weights) in about half the units."""
  rng = np.random.default_rng(7)
  _randomise_weights(DENSE_HEAD, rng)
  x = rng.uniform(0, 1, (16, 6, 6, 2)).astype(np.float32)
  box = ibp.input_box(x, eps)
  lo, hi = (v.numpy().astype(np.float64) for v in ibp.logit_bounds(DENSE_HEAD, *box))
  upper = ibp.logit_difference_upper(DENSE_HEAD, *box).numpy().astype(np.float64)
  w = DENSE_HEAD.layers[-1].kernel.numpy().astype(np.float64)
  b = DENSE_HEAD.layers[-1].bias.numpy().astype(np.float64)
  z = x.reshape(16, -1).astype(np.float64) @ w + b
  assert np.all(lo <= z) and np.all(z <= hi), (np.min(z - lo), np.min(hi - z))
  assert np.all(z[:, :, None] - z[:, None, :] <= upper)
