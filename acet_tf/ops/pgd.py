"""PGD in the L-infinity ball intersected with the box [0, 1], with pluggable objectives.

Used by ACET training (maximise the max log-confidence near noise images) and by evaluation
(adversarial noise; adversarial samples that maximise the true label's cross-entropy).
"""

import keras
import tensorflow as tf

from acet_tf import cpu_backend
from acet_tf.ops import losses
from acet_tf.ops import seed_streams


def max_log_confidence_objective(logits, labels):
  """Adversarial noise: the attacker seeks high confidence in any class. Returns [B]."""
  del labels  # Unused: any class will do.
  return losses.max_log_confidence(logits)


def targeted_log_confidence_objective(logits, labels):
  """APGD-T's adversarial noise: the log-probability of the target class `labels`. Returns [B]."""
  return tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), labels, batch_dims=1)


def cross_entropy_objective(logits, labels):
  """Adversarial samples: the attacker moves away from the true label. Returns [B]."""
  return losses.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------------
# The input gradient of the objective, PGD's inner pass.
# ----------------------------------------------------------------------------------------------

# Gradient of Conv2D used inside PGD on CPU (see _conv2d_grad_cpu).
_CONV2D_GRAD_CPU = 'AcetConv2DGradCpu'


@tf.RegisterGradient(_CONV2D_GRAD_CPU)
def _conv2d_grad_cpu(op, grad):
  """Conv2D's (input, filter) gradients; a one-channel input's gradient as a depthwise conv.

  Performance only, same sums in another order (float32 round-off): for stride 1, 'SAME',
  odd kernels, NHWC and one input channel, dx = sum_c (dy_c correlated with the flipped kernel
  of output channel c). oneDNN's Conv2DBackpropInput with one output channel runs about 3x
  slower than that on CPU, and it is LeNet's first layer on MNIST. Other convolutions take
  TensorFlow's own kernels, as the registered Conv2D gradient does.
  """
  x, w = op.inputs
  attrs = dict(
    strides=op.get_attr('strides'),
    padding=op.get_attr('padding'),
    explicit_paddings=op.get_attr('explicit_paddings'),
    data_format=op.get_attr('data_format'),
    dilations=op.get_attr('dilations'),
    use_cudnn_on_gpu=op.get_attr('use_cudnn_on_gpu'),
  )
  # Pruned when unused, as in PGD, which differentiates with respect to the input only.
  grad_w = tf.raw_ops.Conv2DBackpropFilter(
    input=x, filter_sizes=tf.shape(w), out_backprop=grad, **attrs
  )
  kh, kw, c_in, c_out = w.shape
  # x.shape[-1] == c_in == 1: not a grouped convolution (whose filter has 1 channel per group).
  if (
    w.dtype == tf.float32
    and c_in == 1
    and x.shape[-1] == 1
    and kh is not None
    and kw is not None
    and kh % 2 == 1
    and kw % 2 == 1
    and attrs['padding'] == b'SAME'
    and attrs['data_format'] == b'NHWC'
    and list(attrs['strides']) == [1, 1, 1, 1]
    and list(attrs['dilations']) == [1, 1, 1, 1]
  ):
    flipped = tf.reshape(tf.reverse(w, axis=[0, 1]), [kh, kw, c_out, 1])
    grad_x = tf.reduce_sum(
      tf.nn.depthwise_conv2d(grad, flipped, [1, 1, 1, 1], 'SAME'), axis=-1, keepdims=True
    )
  else:
    grad_x = tf.raw_ops.Conv2DBackpropInput(
      input_sizes=tf.shape(x), filter=w, out_backprop=grad, **attrs
    )
  return grad_x, grad_w


# Gradient of MatMul used inside PGD on CPU (see _matmul_grad_cpu).
_MATMUL_GRAD_CPU = 'AcetMatMulGradCpu'


@tf.RegisterGradient(_MATMUL_GRAD_CPU)
def _matmul_grad_cpu(op, grad):
  """MatMul's (a, b) gradients; for y = a @ b, da = grad @ b^T as an einsum.

  Performance only, the same sums in another order (float32 round-off): oneDNN's MatMul with
  transpose_b runs about 1.7x slower than the same product as an einsum on CPU (LeNet's fc1,
  [128, 1024] x [1024, 3136]: 9.6-10.1 vs 5.5-5.8 ms), and it is in every PGD step. Other
  transpose attributes take TensorFlow's own formulas.
  """
  a, b = op.inputs
  t_a, t_b = op.get_attr('transpose_a'), op.get_attr('transpose_b')
  if t_a or t_b:  # TensorFlow's formulas (math_grad._MatMulGrad).
    if not t_a:
      return tf.matmul(grad, b), tf.matmul(grad, a, transpose_a=True)
    if not t_b:
      return tf.matmul(b, grad, transpose_b=True), tf.matmul(a, grad)
    return (
      tf.matmul(b, grad, transpose_a=True, transpose_b=True),
      tf.matmul(grad, a, transpose_a=True, transpose_b=True),
    )
  # Pruned when unused, as in PGD, which differentiates with respect to the input only.
  grad_b = tf.matmul(a, grad, transpose_a=True)
  return tf.einsum('bj,ij->bi', grad, b), grad_b


def _on_cpu_only():
  """True without GPUs and TPUs: the CPU workarounds below are for CPU kernels only."""
  return not (tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))


# What PGD's pass on CPU does beyond the plain tape, by the CPU kernels TensorFlow runs
# (cpu_backend.kernel_library): 'noinline', the pass as its own function; 'conv',
# _conv2d_grad_cpu; 'matmul', _matmul_grad_cpu. All compute the same values up to float32
# round-off. Each is kept only where it was measured to help, on the LeNet ACET step (BUILD.md,
# "Performance", AMD EPYC Zen 4, 7 December; the AVX2 kernels via ONEDNN_MAX_CPU_ISA=AVX2):
# together, on oneDNN's AVX-512 kernels 1.46-1.64x the tape's images/s; on its AVX2 kernels
# 1.02-1.06x (5-9% less CPU time); on Eigen's kernels 0.87-0.94x, so Eigen gets the plain tape,
# as do kernels not measured.
CPU_PASS_FEATURES = ('noinline', 'conv', 'matmul')
_CPU_PASS_BY_LIBRARY = {
  'onednn_avx512': frozenset(CPU_PASS_FEATURES),
  'onednn_avx2': frozenset(CPU_PASS_FEATURES),
}
_forced_cpu_pass = None


def force_cpu_pass(features):
  """Makes PGD's CPU pass use exactly `features`; None: chosen automatically again.

  `features` is a subset of CPU_PASS_FEATURES, or a variant's name: 'tape' (none) or features
  joined by '+' ('noinline+conv'). For the benchmark and the tests, which compare the variants;
  takes effect for passes built after the call.
  """
  global _forced_cpu_pass
  if isinstance(features, str):
    features = [] if features == 'tape' else features.split('+')
  if features is not None:
    unknown = set(features) - set(CPU_PASS_FEATURES)
    if unknown:
      raise ValueError(f'unknown PGD pass features {sorted(unknown)}; known: {CPU_PASS_FEATURES}')
    features = frozenset(features)
  _forced_cpu_pass = features


def cpu_pass_features():
  """The features of PGD's CPU pass: forced, or chosen from the kernels TensorFlow runs."""
  if _forced_cpu_pass is not None:
    return _forced_cpu_pass
  return _CPU_PASS_BY_LIBRARY.get(cpu_backend.kernel_library(), frozenset())


def _unit_logit_gradient(logits):
  """Identity on logits [B, K] whose backward pass rescales each example's gradient to max 1.

  For float16 bodies (mixed_float16). A confident model's gradient of the objective with respect
  to the logits is tiny (1 - p_max ~ 1e-9): cast to float16 on its way into the body it flushes
  to 0 and PGD's sign steps stop. A positive factor per example changes no sign of the input
  gradient (backpropagation is linear in it and examples are independent), so PGD's steps are
  those of float32 while the float16 gradients stay in range, as loss scaling does for weights.
  """

  @tf.custom_gradient
  def identity(z):
    def grad(dz):
      peak = tf.reduce_max(tf.abs(dz), axis=-1, keepdims=True)
      return dz / tf.where(peak > 0, peak, tf.ones_like(peak))

    return tf.identity(z), grad

  return identity(logits)


def _float16_body():
  """True under a float16 compute policy (mixed_float16), the one with float16's narrow range."""
  return keras.config.dtype_policy().compute_dtype == 'float16'


def objective_and_input_gradient(logits_fn, objective):
  """Returns fn(u, labels) -> (objective float32 [B], d objective_i / d u_i float32 [B, ...]).

  Only the input is differentiated: no gradient is computed for the weights. Examples are
  independent, so the gradient of the sum is the per-example gradient.

  On CPU, performance changes that compute the same values up to float32 summation order, each
  where it helps on the kernel library TensorFlow runs (cpu_pass_features; BUILD.md,
  "Performance"):
  - The pass is its own (not inlined) function. Inlined into PGD's while loop, oneDNN's graph
    rewrite mostly leaves MaxPoolGrad on the slow Eigen kernel (a fifth of LeNet's PGD step;
    which ones it rewrites varies from run to run); as its own function body it always gets
    the oneDNN kernel.
  - Conv2D's and MatMul's input gradients use _conv2d_grad_cpu and _matmul_grad_cpu (via
    tf.gradients, which honours a gradient override; GradientTape does not).

  Under a float16 compute policy (mixed_float16, read when this is called) each example's
  gradient is rescaled at the logits (_unit_logit_gradient): the gradient then has the float32
  gradient's signs but not its size, which PGD (sign steps) does not use. The objective is
  unchanged.
  """
  rescale = _unit_logit_gradient if _float16_body() else tf.identity

  def tape_pass(u, labels):
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(u)
      obj = objective(rescale(logits_fn(u)), labels)
    return obj, tape.gradient(obj, u)

  if not _on_cpu_only():
    return tape_pass
  features = cpu_pass_features()
  overrides = {}
  if 'conv' in features:
    overrides['Conv2D'] = _CONV2D_GRAD_CPU
  if 'matmul' in features:
    overrides['MatMul'] = _MATMUL_GRAD_CPU

  def cpu_pass(u, labels):
    with tf.compat.v1.get_default_graph().gradient_override_map(overrides):
      obj = objective(rescale(logits_fn(u)), labels)
    return obj, tf.gradients(obj, u)[0]

  if 'noinline' not in features:
    return cpu_pass if overrides else tape_pass
  return tf.function(cpu_pass, autograph=False, experimental_attributes={'_noinline': True})


def _per_example(mask, like):
  """Reshapes a [B] mask to broadcast against `like` ([B, ...])."""
  return tf.reshape(mask, [-1] + [1] * (len(like.shape) - 1))


def pgd(
  logits_fn,
  x0,
  objective,
  *,
  eps,
  step_size,
  steps,
  seed,
  labels=None,
  random_start=True,
  init=None,
):
  """Maximises `objective` per example over ||u - x0||_inf <= eps, u in [0, 1].

  Sign-gradient ascent with projection. The result is, per example, the best point seen: the
  unperturbed x0, the random start and every iterate (the reference's rule). The objective at
  iterate t comes from the forward pass that also gives step t's gradient, so the attack costs
  steps + 2 forward passes (x0 and the last iterate) and `steps` input-gradient passes.

  Args:
    logits_fn: maps float32 [B, ...] to logits [B, K]; call the model in inference mode in it
      (BatchNorm on moving statistics, nothing updates).
    x0: float32 [B, ...] in [0, 1].
    objective: (logits, labels) -> float32 [B], the value to maximise.
    eps, step_size: floats; steps: int >= 0.
    seed: int [2] stateless seed for the random start.
    labels: int [B] or None, passed to the objective.
    random_start: u0 = clip(x0 + s * U(-eps, eps)) with one s ~ U(0, 1) per example.
    init: float32 [B, ...] or None: start there (projected into the ball and box) instead; for
      step schedules that continue from an earlier segment's best point (attack_spec.Attack).

  Returns:
    (best float32 [B, ...], best objective float32 [B]), both without gradient: nothing flows
    back through the attack into a training loss.
  """
  x0 = tf.stop_gradient(tf.convert_to_tensor(x0, tf.float32))
  b = tf.shape(x0)[0]
  lo = tf.maximum(x0 - eps, 0.0)
  hi = tf.minimum(x0 + eps, 1.0)
  best_u = x0
  best_obj = objective(logits_fn(x0), labels)
  if init is not None:
    u = tf.clip_by_value(tf.stop_gradient(tf.convert_to_tensor(init, tf.float32)), lo, hi)
  elif random_start:
    seed_scale, seed_delta = seed_streams.split(seed, 2)
    scale = seed_streams.uniform(seed_scale, b, [1] * (len(x0.shape) - 1))
    delta = seed_streams.uniform(seed_delta, b, x0.shape[1:], -eps, eps)
    u = tf.clip_by_value(x0 + scale * delta, lo, hi)
  else:
    u = x0

  def keep_best(u, obj, best_u, best_obj):
    better = obj > best_obj
    return tf.where(_per_example(better, u), u, best_u), tf.where(better, obj, best_obj)

  grad_fn = objective_and_input_gradient(logits_fn, objective)

  def body(t, u, best_u, best_obj):
    obj, grad = grad_fn(u, labels)
    best_u, best_obj = keep_best(u, obj, best_u, best_obj)
    u = tf.clip_by_value(u + step_size * tf.sign(grad), lo, hi)
    return t + 1, u, best_u, best_obj

  if steps > 0:
    _, u, best_u, best_obj = tf.while_loop(
      lambda t, *_: t < steps, body, (tf.constant(0), u, best_u, best_obj)
    )
  best_u, best_obj = keep_best(u, objective(logits_fn(u), labels), best_u, best_obj)
  return tf.stop_gradient(best_u), tf.stop_gradient(best_obj)
