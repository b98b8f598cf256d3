"""PGD in the L-infinity ball intersected with the box [0, 1], with pluggable objectives.

Used by ACET training (maximise the max log-confidence near noise images) and by evaluation
(adversarial noise; adversarial samples that maximise the true label's cross-entropy).
"""
import tensorflow as tf

from acet_tf import batch_random
from acet_tf import losses


def max_log_confidence_objective(logits, labels):
  """Adversarial noise: the attacker seeks high confidence in any class. Returns [B]."""
  del labels  # Unused: any class will do.
  return losses.max_log_confidence(logits)


def cross_entropy_objective(logits, labels):
  """Adversarial samples: the attacker moves away from the true label. Returns [B]."""
  return losses.cross_entropy(logits, labels)


def _per_example(mask, like):
  """Reshapes a [B] mask to broadcast against `like` ([B, ...])."""
  return tf.reshape(mask, [-1] + [1] * (len(like.shape) - 1))


def pgd(logits_fn, x0, objective, *, eps, step_size, steps, seed, labels=None,
        random_start=True):
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
  if random_start:
    seed_scale, seed_delta = batch_random.split(seed, 2)
    scale = batch_random.uniform(seed_scale, b, [1] * (len(x0.shape) - 1))
    delta = batch_random.uniform(seed_delta, b, x0.shape[1:], -eps, eps)
    u = tf.clip_by_value(x0 + scale * delta, lo, hi)
  else:
    u = x0

  def keep_best(u, obj, best_u, best_obj):
    better = obj > best_obj
    return tf.where(_per_example(better, u), u, best_u), tf.where(better, obj, best_obj)

  def body(t, u, best_u, best_obj):
    # Only the input is watched: no gradient is computed for the weights.
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch(u)
      obj = objective(logits_fn(u), labels)
    grad = tape.gradient(obj, u)  # Examples are independent: d(sum)/du_i = d obj_i / du_i.
    best_u, best_obj = keep_best(u, obj, best_u, best_obj)
    u = tf.clip_by_value(u + step_size * tf.sign(grad), lo, hi)
    return t + 1, u, best_u, best_obj

  if steps > 0:
    _, u, best_u, best_obj = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), u, best_u, best_obj))
  best_u, best_obj = keep_best(u, objective(logits_fn(u), labels), best_u, best_obj)
  return tf.stop_gradient(best_u), tf.stop_gradient(best_obj)
