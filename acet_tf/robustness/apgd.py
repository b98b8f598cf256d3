"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks"), L-infinity, on any objective.

Sign-gradient ascent with momentum alpha = 0.75 and a step size that starts at 2 eps and is halved
at checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
0.06), when either
  1. fewer than rho = 0.75 of the steps since the last checkpoint raised the objective, or
  2. the step size was not halved at the last checkpoint and the best objective has not risen since;
after a halving the iterate restarts from the best point seen (with its gradient). The momentum
term keeps the iterate before it (x_max - x_{k-1}), as Algorithm 1 of the paper (x_{k+1} := x_max)
and the authors' autoattack/autopgd_base.py (x_adv_old is not reset) do.

Like pgd.pgd it costs one forward + input-gradient pass per step (attacks.
objective_and_input_gradient) plus one forward of the last iterate, and returns the best point.
"""

import math

import tensorflow as tf

from acet_tf.ops import pgd
from acet_tf.ops import seed_streams

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps):
  """The iterations (sorted ints in (0, steps)) where APGD may halve its step size."""
  if steps < 0:
    raise ValueError(f'steps must be >= 0, got {steps}')
  p = [0.0, 0.22]
  while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
    p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
  # 1e-9: p_j is a sum of decimals (0.22 + 0.19 = 0.41000000000000003 must give 41, not 42).
  return sorted({math.ceil(q * steps - 1e-9) for q in p[1:]} & set(range(1, steps)))


def _schedule(steps):
  """(is_checkpoint bool [steps], window float32 [steps]: steps since the previous checkpoint)."""
  marks = checkpoints(steps)
  is_ckpt, window, last = [False] * steps, [1.0] * steps, 0
  for w in marks:
    is_ckpt[w], window[w], last = True, float(w - last), w
  return tf.constant(is_ckpt or [False]), tf.constant(window or [1.0])


def _where(mask, a, b):
  return tf.where(tf.reshape(mask, [-1] + [1] * (len(a.shape) - 1)), a, b)


def apgd(logits_fn, x0, objective, *, eps, steps, seed, labels=None, random_start=True):
  """Maximises `objective` per example over ||u - x0||_inf <= eps, u in [0, 1].

  Args:
    logits_fn: float32 [B, ...] -> logits [B, K], the model in inference mode.
    x0: float32 [B, ...] in [0, 1], the centres of the balls.
    objective: (logits, labels) -> float32 [B], the value to maximise.
    eps: float > 0; steps: int >= 0 (the iteration budget N).
    seed: int [2] stateless seed of the start.
    labels: int [B] or None, passed to the objective.
    random_start: start at clip(x0 + U(-eps, eps)) (Croce & Hein's start); else at x0.

  Returns:
    (best float32 [B, ...], best objective float32 [B]) without gradient: per example the best of
    the start and every iterate.
  """
  if eps <= 0:
    raise ValueError(f'eps must be > 0, got {eps}')
  x0 = tf.stop_gradient(tf.convert_to_tensor(x0, tf.float32))
  lo, hi = tf.maximum(x0 - eps, 0.0), tf.minimum(x0 + eps, 1.0)
  if random_start:
    delta = seed_streams.uniform(seed, tf.shape(x0)[0], x0.shape[1:], -eps, eps)
    x = tf.clip_by_value(x0 + delta, lo, hi)
  else:
    x = x0
  if steps == 0:
    return tf.stop_gradient(x), tf.stop_gradient(objective(logits_fn(x), labels))
  b = tf.shape(x0)[0]
  grad_fn = pgd.objective_and_input_gradient(logits_fn, objective)
  is_ckpt, window = _schedule(steps)
  neg_inf = tf.fill([b], float('-inf'))
  # f_prev = +inf: step 0 is no "success"; window j counts the steps w_{j-1} + 1, ..., w_j.
  state = dict(
    x=x,
    x_prev=x,
    f_prev=tf.fill([b], float('inf')),
    eta=tf.fill([b], 2.0 * eps),
    best_x=x,
    best_f=neg_inf,
    best_g=tf.zeros_like(x),
    successes=tf.zeros([b]),
    best_f_ckpt=neg_inf,
    reduced_last=tf.zeros([b], tf.bool),
  )

  def body(t, s):
    f, g = grad_fn(s['x'], labels)
    successes = s['successes'] + tf.cast(f > s['f_prev'], tf.float32)
    better = f > s['best_f']
    best_x, best_g = _where(better, s['x'], s['best_x']), _where(better, g, s['best_g'])
    best_f = tf.where(better, f, s['best_f'])
    x, x_prev, f_prev, eta = s['x'], s['x_prev'], f, s['eta']
    best_f_ckpt, reduced_last = s['best_f_ckpt'], s['reduced_last']
    at_ckpt = tf.gather(is_ckpt, t)
    # Conditions 1 and 2 of the paper, evaluated only at checkpoints.
    reduce = at_ckpt & (
      (successes < RHO * tf.gather(window, t)) | (~reduced_last & (best_f <= best_f_ckpt))
    )
    eta = tf.where(reduce, 0.5 * eta, eta)
    x, g = _where(reduce, best_x, x), _where(reduce, best_g, g)
    # x_prev is kept: the first step after a restart has momentum best_x - x_prev.
    f_prev = tf.where(reduce, best_f, f_prev)
    best_f_ckpt = tf.where(at_ckpt, best_f, best_f_ckpt)
    reduced_last = tf.where(at_ckpt, reduce, reduced_last)
    successes = tf.where(at_ckpt, tf.zeros_like(successes), successes)
    z = tf.clip_by_value(x + tf.reshape(eta, [-1] + [1] * (len(x.shape) - 1)) * tf.sign(g), lo, hi)
    a = tf.where(t > 0, MOMENTUM, 1.0)
    x_next = tf.clip_by_value(x + a * (z - x) + (1.0 - a) * (x - x_prev), lo, hi)
    return t + 1, dict(
      x=x_next,
      x_prev=x,
      f_prev=f_prev,
      eta=eta,
      best_x=best_x,
      best_f=best_f,
      best_g=best_g,
      successes=successes,
      best_f_ckpt=best_f_ckpt,
      reduced_last=reduced_last,
    )

  _, s = tf.while_loop(lambda t, _: t < steps, body, (tf.constant(0), state))
  f = objective(logits_fn(s['x']), labels)
  better = f > s['best_f']
  best_x = _where(better, s['x'], s['best_x'])
  best_f = tf.where(better, f, s['best_f'])
  return tf.stop_gradient(best_x), tf.stop_gradient(best_f)
