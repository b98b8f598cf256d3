"""The evaluation beyond the paper: attacked sets (worst case over attacks, restarts and starting
points) and certified (IBP) upper bounds on the confidence, as results.json entries.

An attacked set is a set of ball centres, possibly from several starts (for adversarial noise: the
paper's noise images and uniform noise images, point i of each start being a different centre for
the same index), attacked by every Attack within radius eps. Per point the worst case is the
highest confidence over every (attack, start) pair. The metrics compare the clean in-distribution
confidences (positives) with these worst-case out-confidences, as GOOD's adversarial AUC does; the
guaranteed metrics compare them with the IBP upper bounds (GOOD's guaranteed AUC).
"""

import time

import numpy as np
import tensorflow as tf

from acet_tf.evaluation import ood_metrics
from acet_tf.evaluation import scores
from acet_tf.ops import seed_streams
from acet_tf.robustness import worst_case

UNIFORM_STREAM = 14  # Seed stream of the uniform-noise centres (evaluation.*_STREAM are 11-13).
ATTACKED_STREAM = 15  # Seed stream of the attacks on attacked sets (folded with the set's name).


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


def name_seed(base_seed, name):
  """A seed per attacked set, from its name (stable across runs and Python versions)."""
  return tf.random.experimental.stateless_fold_in(
    seed_streams.step_seed(base_seed, -1, ATTACKED_STREAM),
    int.from_bytes(name.encode()[:7], 'little'),
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


def attacked_set(
  logits_fn, predict_fn, in_conf, starts, attack_list, *, eps, seed, extra=None, name='attacked'
):
  """Every attack from every start; the per-attack and the worst-case metrics.

  Args:
    logits_fn, predict_fn: see worst_case.attack_confidences.
    in_conf: float [N_in] clean in-distribution confidences (the positives).
    starts: {start name: list of (images, labels) batches}, the same number of points each.
    attack_list: attack_spec.Attack sequence.
    eps: L-inf radius.
    seed: int [2]; start s uses fold_in(seed, index of s).
    extra: {key: float [M]} confidences found elsewhere on the same points (the paper's attack
      row), taken into the worst case as further attacks.
    name: for logs.

  Returns:
    (entry, worst float [M]): entry {'eps', 'starts', 'attacks': {'<attack>@<start>': metrics},
    'worst_case': metrics plus 'found_by' {key: points where it was the (first) maximum}}.
  """
  confidences, entry = {}, {'eps': float(eps), 'starts': list(starts), 'attacks': {}}
  for k, conf in (extra or {}).items():
    confidences[k] = np.asarray(conf)
    entry['attacks'][k] = _entry(in_conf, conf)
  for i, (start, batches) in enumerate(starts.items()):
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
      confidences[key] = out[attack.name]['confidence']
      entry['attacks'][key] = dict(
        _entry(in_conf, confidences[key], out[attack.name]['seconds']),
        kind=attack.kind,
        steps=attack.steps,
        restarts=attack.restarts,
        step_fraction=attack.step_fraction,
      )
  worst, which = worst_case.worst_case(confidences)
  keys = list(confidences)
  entry['worst_case'] = dict(
    _entry(in_conf, worst), found_by={k: int(np.sum(which == j)) for j, k in enumerate(keys)}
  )
  return entry, worst


def guaranteed(bound_fn, in_conf, starts):
  """Certified metrics: per point the largest IBP bound over its starts.

  Args:
    bound_fn: images -> float [B] upper bounds on the confidence in the eps-ball
      (ibp.make_bound_fn).
    in_conf: float [N_in] clean in-distribution confidences.
    starts: {start name: list of (images, labels) batches}.

  Returns:
    {'guaranteed_mmc', 'guaranteed_auroc', 'guaranteed_fpr95', 'guaranteed_fpr95_out_positive',
    'guaranteed_aupr_in', 'guaranteed_aupr_out', 'guaranteed_num_examples',
    'guaranteed_seconds'}, plus the per-point bounds float [M] as the second value.
  """
  t = time.time()
  bounds = np.max(
    np.stack(
      [np.concatenate([np.asarray(bound_fn(x)) for x, _ in batches]) for batches in starts.values()]
    ),
    axis=0,
  )
  bounds = np.clip(bounds, 0.0, 1.0)
  m = _entry(in_conf, bounds)
  del m['num_examples']
  out = {f'guaranteed_{k}': v for k, v in m.items()}
  out['guaranteed_fpr95_out_positive'] = (
    None if in_conf is None else scores.fpr95_out_positive(in_conf, bounds)
  )
  out['guaranteed_num_examples'] = int(bounds.size)
  out['guaranteed_seconds'] = time.time() - t
  return out, bounds


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
    {set key: entry}: attacked_set's entry (if attack_list) plus the guaranteed_* keys.
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
      g, _ = guaranteed(ibp.make_bound_fn(bound_model, eps), in_conf, starts)
      entry.update(g)
    results[key] = entry
    if log:
      w = entry.get('worst_case', {})
      fmt = lambda v: '-' if v is None else f'{v:.3f}'
      log(
        f'{key} (eps {eps:g}): worst-case MMC {fmt(w.get("mmc"))} AUROC {fmt(w.get("auroc"))}; '
        f'guaranteed MMC {fmt(entry.get("guaranteed_mmc"))} AUROC '
        f'{fmt(entry.get("guaranteed_auroc"))}'
      )
  return results
