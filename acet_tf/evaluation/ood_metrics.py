"""Evaluation metrics of Table 1 and Table 2: MMC, AUROC, AUPR, FPR@95, threshold calibration.

Conventions: a score is a model's confidence, max_k softmax_k, so higher means "more
in-distribution". The in-distribution test set is the positive class, the out-set the negative one.
Every function takes 1-D array-likes, works in float64, and raises ValueError on empty, non-finite
or
non-1-D input. Everything is sorting-based (O(n log n)), so 10^5 points take milliseconds.
Pure numpy/scipy: no TensorFlow here, so evaluation can run on saved confidences.
"""

import math

import numpy as np
from scipy import stats

# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _as_1d(x, name, allow_inf=False):
  """Returns `x` as a non-empty 1-D float64 array; raises ValueError naming `name` otherwise."""
  try:
    a = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be numeric, could not convert to float64: {e}') from e
  if a.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {a.shape}.')
  if a.size == 0:
    raise ValueError(f'{name} must be non-empty, got 0 elements.')
  bad = np.isnan(a) if allow_inf else ~np.isfinite(a)
  if bad.any():
    what = 'NaN' if allow_inf else 'non-finite (NaN or inf)'
    raise ValueError(
      f'{name} has {int(bad.sum())} {what} value(s), the first at index {int(np.argmax(bad))}.'
    )
  return a


def _same_length(a, a_name, b, b_name):
  if a.shape != b.shape:
    raise ValueError(f'{a_name} and {b_name} must have the same length, got {a.size} and {b.size}.')


def _check_fraction(value, name):
  """Checks 0 < value <= 1 (NaN fails too, since every comparison with NaN is False)."""
  if not 0.0 < value <= 1.0:
    raise ValueError(f'{name} must be in (0, 1], got {value!r}.')


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def mean_max_confidence(confidences):
  """Mean maximum confidence (MMC).

  Args:
    confidences: [N] max_k softmax_k per point, in [0, 1].

  Returns:
    The mean, a float in [0, 1].
  """
  return _mmc(confidences, 'confidences')


def _mmc(confidences, name):
  """Mean of [N] confidences in [0, 1]; `name` is the argument named in errors."""
  c = _as_1d(confidences, name)
  # A softmax probability outside [0, 1] means logits or log-probabilities were passed by mistake.
  if c.min() < 0.0 or c.max() > 1.0:
    raise ValueError(f'{name} must lie in [0, 1] (confidences), got range [{c.min()}, {c.max()}].')
  return float(c.mean())


def error_rate(predictions, labels):
  """Share of wrong predictions.

  Args:
    predictions: [N] predicted class indices.
    labels: [N] true class indices.

  Returns:
    A float in [0, 1].
  """
  p = _as_1d(predictions, 'predictions')
  y = _as_1d(labels, 'labels')
  _same_length(p, 'predictions', y, 'labels')
  return float(np.mean(p != y))


# --------------------------------------------------------------------------------------------------
# Out-of-distribution detection
# --------------------------------------------------------------------------------------------------


def _as_scores(in_scores, out_scores):
  return _as_1d(in_scores, 'in_scores'), _as_1d(out_scores, 'out_scores')


def _cumulative_counts(pos, neg):
  """Positives and negatives at or above each distinct score, thresholds in decreasing order.

  Args:
    pos: [P] float64 scores of the positive class.
    neg: [M] float64 scores of the negative class.

  Returns:
    (tps, fps): int64 [T] each, T = number of distinct scores; entry i counts the points with
    score >= the i-th largest distinct score. Equal scores form one threshold, so ties never split.
  """
  scores = np.concatenate([pos, neg])
  is_pos = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
  order = np.argsort(-scores, kind='stable')
  scores, is_pos = scores[order], is_pos[order]
  # The last index of each run of equal scores closes one threshold.
  last = np.flatnonzero(np.diff(scores) != 0)
  last = np.append(last, scores.size - 1)
  tps = np.cumsum(is_pos)[last]
  fps = (last + 1) - tps
  return tps, fps


def auroc(in_scores, out_scores):
  """Area under the ROC curve, exactly, from ranks (Mann-Whitney U).

  AUROC = P(s_in > s_out) + 1/2 P(s_in == s_out) over all (in, out) pairs; all-equal
  scores give 0.5.

  Args:
    in_scores: [N] scores of the in-distribution (positive) points.
    out_scores: [M] scores of the out-set (negative) points.

  Returns:
    A float in [0, 1].
  """
  pos, neg = _as_scores(in_scores, out_scores)
  # Average ranks give tied pairs exactly 1/2; rank sums are half-integers, exact in float64.
  ranks = stats.rankdata(np.concatenate([pos, neg]), method='average')
  u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
  return float(u / (pos.size * neg.size))


def _average_precision(pos, neg):
  """sklearn's average_precision: sum_k (R_k - R_{k-1}) P_k over distinct thresholds, R_0 = 0."""
  tps, fps = _cumulative_counts(pos, neg)
  precision = tps / (tps + fps)
  recall = tps / pos.size
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr_in(in_scores, out_scores):
  """Area under the precision-recall curve with the in-distribution as positive.

  Step-wise average precision as in sklearn.metrics.average_precision_score:
  AP = sum_k (R_k - R_{k-1}) P_k, where k runs over the distinct scores in decreasing order (equal
  scores form one threshold), P_k and R_k are precision and recall of "score >= k-th score",
  R_0 = 0.

  Args:
    in_scores: [N] scores of the in-distribution points.
    out_scores: [M] scores of the out-set points.

  Returns:
    A float in (0, 1]; 1 for perfect separation.
  """
  pos, neg = _as_scores(in_scores, out_scores)
  return _average_precision(pos, neg)


def aupr_out(in_scores, out_scores):
  """Average precision as `aupr_in`, with the out-set as positive and the scores negated.

  Args:
    in_scores: [N] scores of the in-distribution points.
    out_scores: [M] scores of the out-set points.

  Returns:
    A float in (0, 1]; 1 for perfect separation.
  """
  pos, neg = _as_scores(in_scores, out_scores)
  return _average_precision(-neg, -pos)


def fpr_at_tpr(in_scores, out_scores, tpr=0.95):
  """False positive rate at a fixed true positive rate, the reference's definition.

  threshold = np.percentile(in_scores, 100 - 100 * tpr) with numpy's default 'linear'
  interpolation (the reference's np.percentile(conf_in, 5)): sort the N in-scores ascending as
  x_0 <= ... <= x_{N-1}, h = (N - 1) * (1 - tpr), threshold = x_floor(h) + (h - floor(h)) *
  (x_floor(h)+1 - x_floor(h)). FPR = share of out-scores >= threshold, so out points exactly at the
  threshold are false positives. The TPR actually reached may exceed `tpr` slightly (ties,
  rounding).

  Args:
    in_scores: [N] scores of the in-distribution points.
    out_scores: [M] scores of the out-set points.
    tpr: the target true positive rate, in (0, 1].

  Returns:
    A float in [0, 1].
  """
  pos, neg = _as_scores(in_scores, out_scores)
  _check_fraction(tpr, 'tpr')
  # 100 - 100 * 0.95 is exactly 5.0 in float64, as in the reference; 100 * (1 - 0.95) is not.
  threshold = np.percentile(pos, 100.0 - 100.0 * tpr)
  return float(np.mean(neg >= threshold))


def roc_curve(in_scores, out_scores):
  """The exact ROC curve, one point per distinct score (ties form one diagonal step).

  Args:
    in_scores: [N] scores of the in-distribution (positive) points.
    out_scores: [M] scores of the out-set (negative) points.

  Returns:
    (fpr, tpr): float64 [T + 1] each, non-decreasing, from (0, 0) to (1, 1), where T is the
    number of distinct scores. The trapezoid area under it equals `auroc`.
  """
  pos, neg = _as_scores(in_scores, out_scores)
  tps, fps = _cumulative_counts(pos, neg)
  fpr = np.concatenate([[0.0], fps / neg.size])
  tpr = np.concatenate([[0.0], tps / pos.size])
  return fpr, tpr


def ood_metrics(in_scores, out_scores):
  """All Table 1 detection metrics for one out-set.

  Args:
    in_scores: [N] confidences of the in-distribution test points, in [0, 1].
    out_scores: [M] confidences of the out-set points, in [0, 1].

  Returns:
    {'mmc': MMC of the out-set, 'auroc', 'aupr_in', 'aupr_out', 'fpr95'}, floats.
  """
  return {
    'mmc': _mmc(out_scores, 'out_scores'),
    'auroc': auroc(in_scores, out_scores),
    'aupr_in': aupr_in(in_scores, out_scores),
    'aupr_out': aupr_out(in_scores, out_scores),
    'fpr95': fpr_at_tpr(in_scores, out_scores, tpr=0.95),
  }


# --------------------------------------------------------------------------------------------------
# Abstention threshold
# --------------------------------------------------------------------------------------------------


def calibrate_threshold(confidences, correct, keep=0.95):
  """The largest confidence threshold that keeps at least `keep` of the correctly classified points.

  Rule: let c_1 <= ... <= c_m be the confidences of the m correct points and k = ceil(keep * m)
  (computed with a 1e-9 tolerance so that, e.g., 0.07 * 100 = 7.000000000000001 gives 7, not 8).
  The threshold is t = c_{m-k+1}, the k-th largest. Then at least k correct points have confidence
  >= t (more if t is tied), and any t' > t keeps at most k - 1 < keep * m of them. A classifier
  predicts when confidence >= t and abstains otherwise.

  Args:
    confidences: [N] max softmax probability per point.
    correct: [N] bool (or 0/1): whether the prediction for that point is correct.
    keep: share of correct points to keep, in (0, 1].

  Returns:
    The threshold t, one of the given confidences, as a float.
  """
  c = _as_1d(confidences, 'confidences')
  ok = np.asarray(correct)
  if ok.ndim != 1:
    raise ValueError(f'correct must be 1-D, got shape {ok.shape}.')
  if ok.dtype != bool:
    if not np.isin(ok, (0, 1)).all():
      raise ValueError('correct must be boolean or 0/1.')
    ok = ok.astype(bool)
  _same_length(c, 'confidences', ok, 'correct')
  _check_fraction(keep, 'keep')
  kept = np.sort(c[ok])
  m = kept.size
  if m == 0:
    raise ValueError('correct has no True entry: there are no correctly classified points.')
  k = max(1, math.ceil(keep * m - 1e-9))
  return float(kept[m - k])


# --------------------------------------------------------------------------------------------------
# Table 2
# --------------------------------------------------------------------------------------------------


def _quantile_with_inf(sorted_x, q):
  """numpy's 'linear' quantile of ascending `sorted_x`, extended to +inf entries.

  Interpolating between a finite value and inf gives inf when inf has positive weight; with weight
  zero the finite value is returned (numpy would give NaN from 0 * inf).
  """
  h = (sorted_x.size - 1) * q
  lo = math.floor(h)
  frac = h - lo
  a = sorted_x[lo]
  if frac == 0.0:
    return float(a)
  b = sorted_x[lo + 1]
  if math.isinf(b):
    return float('inf')
  return float(a + frac * (b - a))


def alpha_summary(alphas, alpha_max):
  """Summary of the Table 2 search for the smallest alpha with 99.9% confidence on alpha * noise.

  An alpha >= alpha_max or +inf means "never reached within the search" and counts as +inf. The
  quantiles use numpy's default 'linear' interpolation on the sorted values with those +inf entries;
  a quantile that interpolates towards +inf with positive weight is +inf. So `median` is
  float('inf') exactly when at least N/2 draws (N even) or more than N/2 draws (N odd) were never
  reached; report it as "> alpha_max", as the paper does for ACET on MNIST ("> 1e6").

  Args:
    alphas: [N] the alpha found per draw, positive; +inf or >= alpha_max if never reached.
    alpha_max: the largest alpha the search tried, finite and positive.

  Returns:
    {'median', 'q25', 'q75': floats, possibly inf; 'share_unreached': float in [0, 1]}.
  """
  a = _as_1d(alphas, 'alphas', allow_inf=True)
  if not (math.isfinite(alpha_max) and alpha_max > 0):
    raise ValueError(f'alpha_max must be finite and positive, got {alpha_max!r}.')
  if (a <= 0).any():
    raise ValueError(f'alphas must be positive, got minimum {a.min()}.')
  unreached = a >= alpha_max
  a = np.sort(np.where(unreached, np.inf, a))
  return {
    'median': _quantile_with_inf(a, 0.5),
    'q25': _quantile_with_inf(a, 0.25),
    'q75': _quantile_with_inf(a, 0.75),
    'share_unreached': float(unreached.mean()),
  }
