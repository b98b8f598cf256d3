"""Several attacks, restarts and starting points on one set; the worst case per point.

An attack_spec.Attack names one attack (the paper's PGD or APGD) with its budget.
`attack_confidences` runs every attack on batches of ball centres (noise images, uniform noise, out-
set images) and returns per attack the confidence (max softmax by the evaluator's predict function)
at the attack's best point. The worst case of a point is the highest confidence any attack reached
in its ball(s): the objective of the attacks (max log-confidence) is monotone in the confidence, so
the highest objective is the highest confidence.
"""

import time

from absl import logging
import numpy as np
import tensorflow as tf

from acet_tf.ops import pgd
from acet_tf.robustness import apgd


def restart_seed(seed, r):
  """Seed of restart r: r = 0 is `seed` itself, as evaluation.attack_batches does."""
  return seed if r == 0 else tf.random.experimental.stateless_fold_in(seed, 1000 + r)


def _where(better, u, best):
  """Per example u where `better` [B], else best."""
  return tf.where(tf.reshape(better, [-1] + [1] * (len(u.shape) - 1)), u, best)


def make_attack_fn(logits_fn, attack, objective, eps):
  """A compiled fn(images [B, ...], labels [B], seed [2]) -> best points [B, ...] over restarts."""

  def one(images, labels, seed, random_start):
    if attack.schedule:
      u, obj = None, None
      for steps, fraction in attack.schedule:
        u, obj = pgd.pgd(
          logits_fn,
          images,
          objective,
          eps=eps,
          step_size=fraction * eps,
          steps=steps,
          seed=seed,
          labels=labels,
          random_start=random_start,
          init=u,
        )
      return u, obj
    if attack.kind == 'pgd':
      return pgd.pgd(
        logits_fn,
        images,
        objective,
        eps=eps,
        step_size=attack.step_fraction * eps,
        steps=attack.steps,
        seed=seed,
        labels=labels,
        random_start=random_start,
      )
    if not attack.targets:
      return apgd.apgd(
        logits_fn,
        images,
        objective,
        eps=eps,
        steps=attack.steps,
        seed=seed,
        labels=labels,
        random_start=random_start,
      )
    return targeted(images, labels, seed, random_start)

  def targeted(images, labels, seed, random_start):
    """APGD-T: a run per top class at the centre; per point the best by `objective`."""
    logits = logits_fn(images)
    num_targets = min(attack.targets, logits.shape[-1])
    top = tf.math.top_k(logits, k=num_targets).indices
    best_u, best_obj = None, None
    for t in range(num_targets):
      u, _ = apgd.apgd(
        logits_fn,
        images,
        pgd.targeted_log_confidence_objective,
        eps=eps,
        steps=attack.steps,
        seed=tf.random.experimental.stateless_fold_in(seed, 2000 + t),
        labels=top[:, t],
        random_start=random_start,
      )
      obj = objective(logits_fn(u), labels)
      if best_u is None:
        best_u, best_obj = u, obj
      else:
        best_u = _where(obj > best_obj, u, best_u)
        best_obj = tf.maximum(obj, best_obj)
    return best_u, best_obj

  @tf.function(reduce_retracing=True)
  def run(images, labels, seed):
    best_u, best_obj = one(images, labels, seed, attack.random_start)
    for r in range(1, attack.restarts):
      u, obj = one(images, labels, restart_seed(seed, r), True)
      best_u = _where(obj > best_obj, u, best_u)
      best_obj = tf.maximum(obj, best_obj)
    return best_u

  return run


def attack_confidences(
  logits_fn, predict_fn, batches, attack_list, *, eps, seed, objective=None, name='attack'
):
  """Runs each attack on every batch of ball centres.

  Args:
    logits_fn: images -> logits (inference mode), what the attacks differentiate.
    predict_fn: images -> probabilities [B, K], what the confidences are read from.
    batches: list of (images float32 [b, ...] in [0, 1], labels int [b]).
    attack_list: sequence of attack_spec.Attack with distinct names.
    eps: L-inf radius > 0.
    seed: int [2]; batch i of every attack uses fold_in(seed, i), as evaluation.attack_batches.
    objective: default pgd.max_log_confidence_objective.

  Returns:
    {attack name: {'confidence': float32 [N], 'seconds': float, 'best': first batch's best points
    (for image grids)}}.
  """
  names = [a.name for a in attack_list]
  if len(set(names)) != len(names):
    raise ValueError(f'Attack names must be distinct, got {names}')
  objective = objective or pgd.max_log_confidence_objective
  out = {}
  for attack in attack_list:
    run = make_attack_fn(logits_fn, attack, objective, eps)
    start, conf, first = time.time(), [], None
    for i, (images, labels) in enumerate(batches):
      adv = run(images, labels, tf.random.experimental.stateless_fold_in(seed, i))
      conf.append(np.max(np.asarray(predict_fn(adv)), axis=1))
      first = adv.numpy() if first is None else first
    out[attack.name] = {
      'confidence': np.concatenate(conf),
      'seconds': time.time() - start,
      'best': first,
    }
    entry = out[attack.name]
    logging.info(
      '%s/%s: %d points, %d passes each, MMC %.3f, %.1f s (%.2f points/s)',
      name,
      attack.name,
      entry['confidence'].size,
      attack.passes,
      entry['confidence'].mean(),
      entry['seconds'],
      entry['confidence'].size / max(entry['seconds'], 1e-9),
    )
  return out


def worst_case(confidences):
  """Per-point maximum of {key: float [N]} (same N). Returns (float [N], key index int [N])."""
  if not confidences:
    raise ValueError('worst_case needs at least one attack result.')
  sizes = {k: np.size(v) for k, v in confidences.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'Attack results cover different numbers of points: {sizes}')
  stacked = np.stack([np.asarray(v, np.float64) for v in confidences.values()])
  return stacked.max(axis=0), stacked.argmax(axis=0)
