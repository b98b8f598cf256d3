"""The evaluation beyond the paper: attacked sets (worst case over attacks, restarts and starting
points) and certified (IBP) upper bounds on the confidence, as results.json entries.

An attacked set is a set of ball centres, possibly from several start distributions (for
adversarial noise: the paper's noise images and uniform noise images, point i of each start being
a different centre for the same index), attacked by every Attack within radius eps. Per start
distribution and point the worst case is the highest confidence over the clean centre and every
attack; each start distribution is reported on its own (as GOOD and ProoD report each
out-distribution), and with several starts a 'pooled' figure (per index the maximum over the
starts) is named as such. The metrics compare the clean in-distribution confidences (positives)
with these worst-case out-confidences, as GOOD's adversarial AUC does; the guaranteed metrics
compare them with the IBP upper bounds (GOOD's guaranteed AUC).
"""

import hashlib
import time

import numpy as np
import tensorflow as tf

from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import scores
from acet_tf.ops import seed_streams
from acet_tf.robustness import worst_case

UNIFORM_STREAM = seed_streams.UNIFORM_STREAM  # Seed stream of the uniform-noise centres.
ATTACKED_STREAM = seed_streams.ATTACKED_STREAM  # Attacks on attacked sets, folded with the name.


def default_attack_eps(dataset, image_shape):
  """GOOD's radii for attacked out-sets: 0.3 for 28x28 grey, 0.03 for SVHN, 0.01 otherwise."""
  if tuple(image_shape) == (28, 28, 1):
    return 0.3
  return 0.03 if dataset == 'svhn_cropped' else 0.01


def uniform_batches(like_batches, seed):
  """Uniform noise images in [0, 1], one per image of `like_batches`; yields (images, labels)."""
  for i, (images, labels) in enumerate(like_batches):
    s = tf.random.experimental.stateless_fold_in(seed, i)
    yield tf.random.stateless_uniform(tf.shape(images), seed=s), labels


def name_hash(name):
  """A 56-bit int from SHA-256 of the whole UTF-8 name (stable across runs and Python versions).

  Until issue 22 the seed came from the first 7 bytes of the name, so 'cifar10' and 'cifar100'
  (both default out-sets for SVHN) were attacked with one seed.
  """
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:7], 'little')


def name_seed(base_seed, name):
  """A seed per attacked set, from its whole name."""
  return tf.random.experimental.stateless_fold_in(
    seed_streams.step_seed(base_seed, -1, ATTACKED_STREAM), name_hash(name)
  )


def _entry(in_conf, conf, seconds=None):
  if in_conf is None:  # Data-free: no test confidences, so MMC only (nothing invented).
    e = {
      'mmc': ood_metrics.mean_max_confidence(conf),
      'auroc': None,
      'fpr95': None,
      'aupr_in': None,
      'aupr_out': None,
      'num_examples': int(np.size(conf)),
    }
  else:
    e = dict(ood_metrics.ood_metrics(in_conf, conf), num_examples=int(np.size(conf)))
  if seconds is not None:
    e['seconds'] = seconds
  return e


def _clean_confidences(predict_fn, batches):
  return np.concatenate([np.max(np.asarray(predict_fn(x)), axis=1) for x, _ in batches])


def attacked_set(
  logits_fn, predict_fn, in_conf, starts, attack_list, *, eps, seed, extra=None, name='attacked'
):
  """Every attack from every start; per start distribution the worst case, and a pooled one.

  Args:
    logits_fn, predict_fn: see worst_case.attack_confidences.
    in_conf: float [N_in] clean in-distribution confidences (the positives).
    starts: {start name: list of (images, labels) batches}, the same number of points each.
    attack_list: attack_spec.Attack sequence.
    eps: L-inf radius.
    seed: int [2]; start s uses fold_in(seed, index of s).
    extra: {'<attack>@<start>': float [M]} confidences found elsewhere on the points of that start
      (the paper's attack row), taken into that start's worst case as further attacks.
    name: for logs.

  Returns:
    (entry, {start: worst float [M]}): entry {'eps', 'starts', 'attacks': {'<attack>@<start>':
    metrics}, 'worst_case': {start: metrics plus 'found_by' {key: points where it was the (first)
    maximum}}}, plus 'pooled_worst_case' (point i: the maximum over the balls of every start's
    point i, a max-of-draws figure not comparable with one distribution's) with several starts.
    Each start's worst case has the clean point ('clean@<start>') among its candidates.
  """
  entry = {'eps': float(eps), 'starts': list(starts), 'attacks': {}, 'worst_case': {}}
  per_start = {start: {} for start in starts}
  for k, conf in (extra or {}).items():
    start = k.rpartition('@')[2]
    if start not in per_start:
      raise ValueError(f'extra key {k!r} names no start of {list(starts)}')
    per_start[start][k] = np.asarray(conf)
    entry['attacks'][k] = _entry(in_conf, conf)
  for i, (start, batches) in enumerate(starts.items()):
    key = f'clean@{start}'
    per_start[start][key] = _clean_confidences(predict_fn, batches)
    entry['attacks'][key] = _entry(in_conf, per_start[start][key])
    out = worst_case.attack_confidences(
      logits_fn,
      predict_fn,
      batches,
      attack_list,
      eps=eps,
      seed=tf.random.experimental.stateless_fold_in(seed, i),
      name=f'{name}@{start}',
    )
    for attack in attack_list:
      key = f'{attack.name}@{start}'
      per_start[start][key] = out[attack.name]['confidence']
      entry['attacks'][key] = dict(
        _entry(in_conf, per_start[start][key], out[attack.name]['seconds']),
        kind=attack.kind,
        steps=attack.steps,
        restarts=attack.restarts,
        step_fraction=attack.step_fraction,
        schedule=[list(s) for s in attack.schedule],
        targets=attack.targets,
      )
  worst_of = {}
  for start, confidences in per_start.items():
    worst, which = worst_case.worst_case(confidences)
    worst_of[start] = worst
    entry['worst_case'][start] = dict(
      _entry(in_conf, worst),
      found_by={k: int(np.sum(which == j)) for j, k in enumerate(confidences)},
    )
  if len(starts) > 1:
    entry['pooled_worst_case'] = _entry(in_conf, np.max(np.stack(list(worst_of.values())), axis=0))
  return entry, worst_of


def _guaranteed_entry(in_conf, bounds, seconds):
  m = _entry(in_conf, bounds)
  m['fpr95_out_positive'] = None if in_conf is None else scores.fpr95_out_positive(in_conf, bounds)
  m['seconds'] = seconds
  return m


def guaranteed(bound_fn, in_conf, starts):
  """Certified metrics per start distribution: the IBP bound of each point's ball.

  Args:
    bound_fn: images -> float [B] upper bounds on the confidence in the eps-ball
      (ibp.make_bound_fn).
    in_conf: float [N_in] clean in-distribution confidences.
    starts: {start name: list of (images, labels) batches}.

  Returns:
    ({start: {'mmc', 'auroc', 'fpr95', 'fpr95_out_positive', 'aupr_in', 'aupr_out',
    'num_examples', 'seconds'}} plus 'pooled' (point i: the largest bound over the starts) with
    several starts, {start: per-point bounds float [M]}).
  """
  out, bounds_of = {}, {}
  for start, batches in starts.items():
    t = time.time()
    bounds = np.concatenate([np.asarray(bound_fn(x)) for x, _ in batches])
    bounds_of[start] = np.clip(bounds, 0.0, 1.0)
    out[start] = _guaranteed_entry(in_conf, bounds_of[start], time.time() - t)
  if len(starts) > 1:
    pooled = np.max(np.stack(list(bounds_of.values())), axis=0)
    out['pooled'] = _guaranteed_entry(in_conf, pooled, sum(e['seconds'] for e in out.values()))
  return out, bounds_of


def evaluate_attacked_sets(
  sets,
  *,
  logits_fn,
  predict_fn,
  in_conf,
  attack_list,
  eps_of,
  seed,
  bound_model=None,
  guaranteed_metrics=False,
  extra=None,
  log=None,
):
  """Runs attacked_set (and guaranteed) on every attacked set.

  Args:
    sets: {set key: {start name: list of (images, labels) batches}}.
    logits_fn, predict_fn, in_conf, attack_list: see attacked_set.
    eps_of: {set key: eps}.
    seed: the evaluation base seed (int); each set gets name_seed(seed, key).
    bound_model: a Keras model for the IBP bounds (None: no guaranteed metrics).
    guaranteed_metrics: compute the IBP metrics (needs bound_model).
    extra: {set key: {attack key: float [M]}}, see attacked_set.
    log: optional fn(str) for progress lines.

  Returns:
    {set key: entry}: attacked_set's entry (if attack_list) plus 'guaranteed' (guaranteed's
    per-start metrics).
  """
  from acet_tf.robustness import ibp  # Imported here: only this path needs the graph walker.

  results = {}
  for key, starts in sets.items():
    eps = eps_of[key]
    entry = {'eps': float(eps), 'starts': list(starts)}
    if attack_list:
      entry, _ = attacked_set(
        logits_fn,
        predict_fn,
        in_conf,
        starts,
        attack_list,
        eps=eps,
        seed=name_seed(seed, key),
        extra=(extra or {}).get(key),
        name=key,
      )
    if guaranteed_metrics and bound_model is not None:
      entry['guaranteed'], _ = guaranteed(ibp.make_bound_fn(bound_model, eps), in_conf, starts)
    results[key] = entry
    if log:
      fmt = lambda v: '-' if v is None else f'{v:.3f}'
      for start in starts:
        w = entry.get('worst_case', {}).get(start, {})
        g = entry.get('guaranteed', {}).get(start, {})
        log(
          f'{key}@{start} (eps {eps:g}): worst-case MMC {fmt(w.get("mmc"))} AUROC '
          f'{fmt(w.get("auroc"))}; guaranteed MMC {fmt(g.get("mmc"))} AUROC {fmt(g.get("auroc"))}'
        )
  return results
