"""acet_tf.evaluation.ood_metrics against hand-computed cases and brute-force definitions."""

import math

import numpy as np
import pytest

from acet_tf.evaluation import ood_metrics

# The running example: in=[0.9, 0.5, 0.5], out=[0.5, 0.1]; the 0.5s tie across the two sets.
IN = [0.9, 0.5, 0.5]
OUT = [0.5, 0.1]


def _tied_scores(rng, n, m):
  """Random scores rounded to one decimal, so many ties within and across the two sets."""
  return np.round(rng.random(n), 1), np.round(rng.random(m) * 0.8 + 0.1, 1)


def _brute_auroc(pos, neg):
  """O(n*m) pair count: a win is 1, a tie is 1/2."""
  pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _brute_ap(pos, neg):
  """Average precision by its definition: one threshold per distinct score, highest first."""
  pos, neg = np.asarray(pos, float), np.asarray(neg, float)
  ap, prev_recall = 0.0, 0.0
  for t in sorted(set(pos) | set(neg), reverse=True):
    tp, fp = np.sum(pos >= t), np.sum(neg >= t)
    recall = tp / pos.size
    ap += (recall - prev_recall) * tp / (tp + fp)
    prev_recall = recall
  return ap


# --------------------------------------------------------------------------------------------------
# MMC and error rate
# --------------------------------------------------------------------------------------------------


def test_mean_max_confidence():
  assert ood_metrics.mean_max_confidence([0.1, 0.5, 0.9, 1.0]) == pytest.approx(0.625)


def test_mean_max_confidence_rejects_values_outside_unit_interval():
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    ood_metrics.mean_max_confidence([0.5, 3.2])  # Logits, not probabilities.


def test_error_rate():
  assert ood_metrics.error_rate([0, 1, 2, 3], [0, 1, 1, 0]) == pytest.approx(0.5)
  assert ood_metrics.error_rate(np.array([7]), np.array([7])) == 0.0


def test_error_rate_length_mismatch():
  with pytest.raises(ValueError, match='same length'):
    ood_metrics.error_rate([0, 1], [0, 1, 2])


# --------------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------------


def test_auroc_perfect_reversed_and_constant():
  assert ood_metrics.auroc([0.8, 0.9, 1.0], [0.1, 0.2]) == 1.0
  assert ood_metrics.auroc([0.1, 0.2], [0.8, 0.9, 1.0]) == 0.0
  assert ood_metrics.auroc([0.3] * 4, [0.3] * 7) == 0.5


def test_auroc_hand_case_with_ties():
  # 3 x 2 = 6 (in, out) pairs:
  #   0.9 vs 0.5 win, 0.9 vs 0.1 win                 -> 2
  #   0.5 vs 0.5 tie (twice, one per in 0.5)         -> 2 * 1/2 = 1
  #   0.5 vs 0.1 win (twice)                         -> 2
  # AUROC = 5 / 6.
  assert ood_metrics.auroc(IN, OUT) == pytest.approx(5 / 6)


def test_auroc_matches_pair_count_on_tied_random_data():
  rng = np.random.default_rng(0)
  for _ in range(30):
    pos, neg = _tied_scores(rng, rng.integers(1, 60), rng.integers(1, 60))
    assert ood_metrics.auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg), abs=1e-12)


def test_auroc_is_fast_on_large_input():
  # 10^5 x 10^5 pairs: an O(n*m) implementation would not finish in the test's time.
  rng = np.random.default_rng(1)
  pos, neg = rng.random(100_000), rng.random(100_000) * 0.5
  value = ood_metrics.auroc(pos, neg)
  # P(U > V/2) for U, V ~ U(0, 1) is 3/4; with 10^10 pairs the estimate is close.
  assert value == pytest.approx(0.75, abs=0.01)


# --------------------------------------------------------------------------------------------------
# AUPR
# --------------------------------------------------------------------------------------------------


def test_aupr_in_hand_case_with_ties():
  # Thresholds, highest first (in positive):
  #   >= 0.9: tp=1 fp=0 -> P=1,   R=1/3
  #   >= 0.5: tp=3 fp=1 -> P=3/4, R=1   (the three 0.5s form one threshold)
  #   >= 0.1: tp=3 fp=2 -> R unchanged, contributes 0
  # AP = 1/3 * 1 + 2/3 * 3/4 = 5/6.
  assert ood_metrics.aupr_in(IN, OUT) == pytest.approx(5 / 6)


def test_aupr_out_hand_case_with_ties():
  # Out positive, scores negated: out=[-0.5, -0.1], in=[-0.9, -0.5, -0.5].
  #   >= -0.1: tp=1 fp=0 -> P=1,   R=1/2
  #   >= -0.5: tp=2 fp=2 -> P=1/2, R=1
  #   >= -0.9: R unchanged, contributes 0
  # AP = 1/2 * 1 + 1/2 * 1/2 = 3/4.
  assert ood_metrics.aupr_out(IN, OUT) == pytest.approx(3 / 4)


def test_aupr_ties_are_one_threshold_not_an_ordering():
  # All scores equal: one threshold, precision = share of positives, recall jumps 0 -> 1.
  # Breaking the tie in any order would give a different value.
  assert ood_metrics.aupr_in([0.5, 0.5], [0.5]) == pytest.approx(2 / 3)
  assert ood_metrics.aupr_out([0.5, 0.5], [0.5]) == pytest.approx(1 / 3)


def test_aupr_perfect_separation():
  assert ood_metrics.aupr_in([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
  assert ood_metrics.aupr_out([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0


def test_aupr_matches_brute_force_on_tied_random_data():
  rng = np.random.default_rng(2)
  for _ in range(30):
    pos, neg = _tied_scores(rng, rng.integers(1, 60), rng.integers(1, 60))
    assert ood_metrics.aupr_in(pos, neg) == pytest.approx(_brute_ap(pos, neg), abs=1e-12)
    assert ood_metrics.aupr_out(pos, neg) == pytest.approx(_brute_ap(-neg, -pos), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# FPR at 95% TPR
# --------------------------------------------------------------------------------------------------


def test_fpr_at_tpr_linear_percentile():
  # in = 1..100: h = 99 * 0.05 = 4.95 -> threshold = 5 + 0.95 * (6 - 5) = 5.95 ('linear').
  # 'lower' would give 5 (and count 5.5), 'higher'/'nearest' 6 (and miss 5.96).
  in_scores = np.arange(1, 101, dtype=float)
  assert ood_metrics.fpr_at_tpr(in_scores, [5.5, 5.96]) == pytest.approx(0.5)
  assert ood_metrics.fpr_at_tpr(in_scores, [5.9, 5.96, 6.0, 100.0, 0.0]) == pytest.approx(3 / 5)


def test_fpr_at_tpr_counts_points_at_threshold():
  # in = 0..100: h = 100 * 0.05 = 5 exactly, threshold = 5.0; an out point at 5.0 is a false
  # positive.
  in_scores = np.arange(0, 101, dtype=float)
  assert ood_metrics.fpr_at_tpr(in_scores, [5.0]) == 1.0
  assert ood_metrics.fpr_at_tpr(in_scores, [np.nextafter(5.0, 0.0)]) == 0.0
  # tpr=0.5 on five points: threshold = the median 0.3, which counts.
  assert ood_metrics.fpr_at_tpr([0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.29], tpr=0.5) == 0.5


def test_fpr_at_tpr_rejects_bad_tpr():
  with pytest.raises(ValueError, match='tpr'):
    ood_metrics.fpr_at_tpr([0.5], [0.5], tpr=0.0)
  with pytest.raises(ValueError, match='tpr'):
    ood_metrics.fpr_at_tpr([0.5], [0.5], tpr=1.5)


# --------------------------------------------------------------------------------------------------
# ROC curve
# --------------------------------------------------------------------------------------------------


def test_roc_curve_hand_case():
  fpr, tpr = ood_metrics.roc_curve(IN, OUT)
  # Thresholds 0.9, 0.5 (tie: one diagonal step), 0.1.
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])


def test_roc_curve_monotone_endpoints_and_area():
  rng = np.random.default_rng(3)
  for _ in range(20):
    pos, neg = _tied_scores(rng, rng.integers(1, 80), rng.integers(1, 80))
    fpr, tpr = ood_metrics.roc_curve(pos, neg)
    assert fpr.shape == tpr.shape
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # Tied groups are diagonal segments, which the trapezoid rule counts as 1/2 per tied pair.
    assert np.trapezoid(tpr, fpr) == pytest.approx(ood_metrics.auroc(pos, neg), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# ood_metrics
# --------------------------------------------------------------------------------------------------


def test_ood_metrics_collects_everything():
  result = ood_metrics.ood_metrics(IN, OUT)
  assert set(result) == {'mmc', 'auroc', 'aupr_in', 'aupr_out', 'fpr95'}
  assert result['mmc'] == pytest.approx(0.3)  # Mean of the OUT-set, not the in-set.
  assert result['auroc'] == pytest.approx(5 / 6)
  assert result['aupr_in'] == pytest.approx(5 / 6)
  assert result['aupr_out'] == pytest.approx(3 / 4)
  # 5th percentile of [0.5, 0.5, 0.9] is 0.5; one of two outs is >= 0.5.
  assert result['fpr95'] == pytest.approx(0.5)


def test_ood_metrics_names_the_bad_argument():
  with pytest.raises(ValueError, match='out_scores'):
    ood_metrics.ood_metrics(IN, [])


# --------------------------------------------------------------------------------------------------
# calibrate_threshold
# --------------------------------------------------------------------------------------------------


def test_calibrate_threshold_hand_case():
  conf = [0.2, 0.9, 0.8, 0.7, 0.6, 0.99]
  correct = [False, True, True, True, True, False]
  # Correct confidences 0.6, 0.7, 0.8, 0.9; keep 3 of 4 -> the 3rd largest, 0.7. The wrong points
  # (0.2 and 0.99) must not matter.
  assert ood_metrics.calibrate_threshold(conf, correct, keep=0.75) == 0.7
  assert ood_metrics.calibrate_threshold(conf, correct, keep=0.76) == 0.6  # Needs all 4.
  assert ood_metrics.calibrate_threshold(conf, correct, keep=1.0) == 0.6
  assert ood_metrics.calibrate_threshold(conf, np.array(correct, int), keep=0.25) == 0.9


def test_calibrate_threshold_float_rounding_of_keep_times_m():
  # 0.07 * 100 = 7.000000000000001 in float64; it must need 7 points, not 8.
  conf = np.arange(100) / 100.0
  assert ood_metrics.calibrate_threshold(conf, np.ones(100, bool), keep=0.07) == 0.93
  assert ood_metrics.calibrate_threshold(conf, np.ones(100, bool), keep=0.95) == 0.05


def test_calibrate_threshold_with_ties():
  # keep 2 of 4 -> t = 0.5, which keeps all three 0.5s as well; 0.9 would keep only one.
  assert ood_metrics.calibrate_threshold([0.5, 0.5, 0.5, 0.9], [True] * 4, keep=0.5) == 0.5


def test_calibrate_threshold_is_the_largest_valid_one():
  rng = np.random.default_rng(4)
  for _ in range(20):
    n = int(rng.integers(5, 300))
    conf = np.round(rng.random(n), 2)
    correct = rng.random(n) < 0.7
    correct[0] = True
    kept = conf[correct]
    t = ood_metrics.calibrate_threshold(conf, correct, keep=0.95)
    assert np.mean(kept >= t) >= 0.95
    # Every larger threshold (the next float, and each larger candidate) keeps fewer than 95%.
    assert np.mean(kept >= np.nextafter(t, np.inf)) < 0.95
    for larger in np.unique(conf[conf > t]):
      assert np.mean(kept >= larger) < 0.95


def test_calibrate_threshold_errors():
  with pytest.raises(ValueError, match='no correctly classified'):
    ood_metrics.calibrate_threshold([0.5, 0.6], [False, False])
  for keep in (0.0, -0.1, 1.01, float('nan')):
    with pytest.raises(ValueError, match='keep'):
      ood_metrics.calibrate_threshold([0.5, 0.6], [True, True], keep=keep)
  with pytest.raises(ValueError, match='same length'):
    ood_metrics.calibrate_threshold([0.5, 0.6], [True])
  with pytest.raises(ValueError, match='boolean'):
    ood_metrics.calibrate_threshold([0.5, 0.6], [2, 1])


# --------------------------------------------------------------------------------------------------
# alpha_summary
# --------------------------------------------------------------------------------------------------


def test_alpha_summary_hand_case_with_unreached():
  # 1e6 (= alpha_max) and inf are unreached. Sorted: [1.5, 2, 2.5, 3, inf, inf], N = 6.
  #   median: h = 2.5 -> 2.5 + 0.5 * (3 - 2.5) = 2.75
  #   q25:    h = 1.25 -> 2 + 0.25 * 0.5 = 2.125
  #   q75:    h = 3.75 -> between 3 and inf with weight 0.75 on inf -> inf
  out = ood_metrics.alpha_summary([1.5, 2.0, 3.0, np.inf, 1e6, 2.5], alpha_max=1e6)
  assert out['median'] == pytest.approx(2.75)
  assert out['q25'] == pytest.approx(2.125)
  assert out['q75'] == float('inf')
  assert out['share_unreached'] == pytest.approx(2 / 6)


def test_alpha_summary_infinite_median_and_exact_order_statistic():
  # Sorted [1, 2, inf, inf, inf]: median h = 2 -> inf; q25 h = 1 lands exactly on 2
  # (no 0 * inf NaN).
  out = ood_metrics.alpha_summary([2.0, 1.0, 5e6, np.inf, 1e6], alpha_max=1e6)
  assert out['median'] == float('inf')
  assert out['q25'] == 2.0
  assert out['q75'] == float('inf')
  assert out['share_unreached'] == pytest.approx(0.6)


def test_alpha_summary_all_reached_matches_numpy():
  alphas = np.random.default_rng(5).random(101) * 50 + 1
  out = ood_metrics.alpha_summary(alphas, alpha_max=1e6)
  assert out['median'] == pytest.approx(np.percentile(alphas, 50))
  assert out['q25'] == pytest.approx(np.percentile(alphas, 25))
  assert out['q75'] == pytest.approx(np.percentile(alphas, 75))
  assert out['share_unreached'] == 0.0


def test_alpha_summary_errors():
  with pytest.raises(ValueError, match='NaN'):
    ood_metrics.alpha_summary([1.0, np.nan], alpha_max=10.0)
  with pytest.raises(ValueError, match='alpha_max'):
    ood_metrics.alpha_summary([1.0], alpha_max=np.inf)
  with pytest.raises(ValueError, match='positive'):
    ood_metrics.alpha_summary([1.0, -np.inf], alpha_max=10.0)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------

_SCORE_FUNCTIONS = (
  ood_metrics.auroc,
  ood_metrics.aupr_in,
  ood_metrics.aupr_out,
  ood_metrics.fpr_at_tpr,
  ood_metrics.roc_curve,
  ood_metrics.ood_metrics,
)


@pytest.mark.parametrize('fn', _SCORE_FUNCTIONS)
def test_validation_empty(fn):
  with pytest.raises(ValueError, match='in_scores must be non-empty'):
    fn([], [0.5])
  with pytest.raises(ValueError, match='out_scores must be non-empty'):
    fn([0.5], [])


@pytest.mark.parametrize('fn', _SCORE_FUNCTIONS)
def test_validation_non_finite(fn):
  with pytest.raises(ValueError, match=r'in_scores has 1 non-finite .* index 1'):
    fn([0.5, np.nan, 0.7], [0.5])
  with pytest.raises(ValueError, match='out_scores has 2 non-finite'):
    fn([0.5], [np.inf, 0.2, -np.inf])


@pytest.mark.parametrize('fn', _SCORE_FUNCTIONS)
def test_validation_two_dimensional(fn):
  with pytest.raises(ValueError, match=r'in_scores must be 1-D, got shape \(2, 2\)'):
    fn([[0.5, 0.6], [0.7, 0.8]], [0.5])
  with pytest.raises(ValueError, match='out_scores must be 1-D'):
    fn([0.5], np.float64(0.5))  # A scalar is not a 1-D array either.


def test_validation_other_functions():
  with pytest.raises(ValueError, match='confidences must be non-empty'):
    ood_metrics.mean_max_confidence([])
  with pytest.raises(ValueError, match='confidences has 1 non-finite'):
    ood_metrics.mean_max_confidence([0.5, math.nan])
  with pytest.raises(ValueError, match='predictions must be 1-D'):
    ood_metrics.error_rate(np.zeros((3, 10)), [0, 1, 2])  # Logits instead of class indices.
  with pytest.raises(ValueError, match='confidences must be 1-D'):
    ood_metrics.calibrate_threshold(np.zeros((2, 2)), [True, True])
  with pytest.raises(ValueError, match='alphas must be non-empty'):
    ood_metrics.alpha_summary([], alpha_max=10.0)
  with pytest.raises(ValueError, match='in_scores must be numeric'):
    ood_metrics.auroc(['a', 'b'], [0.5])
