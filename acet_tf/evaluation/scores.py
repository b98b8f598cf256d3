"""Detection scores from one forward pass, and FPR@95 under both conventions.

Every score is "higher = more in-distribution":
  max_softmax  max_k softmax_k(z), the paper's score (and the export's abstain threshold).
  max_logit    max_k z_k (Hendrycks et al. 2022).
  energy       logsumexp_k z_k, the negative free energy at temperature 1 (Liu et al. 2020).
FPR@95 conventions:
  fpr95_in_positive   the paper's (ood_metrics.fpr_at_tpr): threshold keeps 95% of the
                      in-distribution; FPR = share of out-points at or above it.
  fpr95_out_positive  OpenOOD v1.5's: the out-set is the positive class (scores negated);
                      threshold detects 95% of the out-points; FPR = share of in-distribution
                      points flagged as out (at or below it).
"""

import numpy as np
import tensorflow as tf

from acet_tf.evaluation import ood_metrics

SCORES = ('max_softmax', 'max_logit', 'energy')


def scores_from_logits(logits):
  """{score name: float32 [B]} and the argmax int32 [B] from logits [B, K]."""
  logits = tf.cast(logits, tf.float32)
  return {
    'max_softmax': tf.reduce_max(tf.nn.softmax(logits), axis=1),
    'max_logit': tf.reduce_max(logits, axis=1),
    'energy': tf.reduce_logsumexp(logits, axis=1),
  }, tf.argmax(logits, axis=1, output_type=tf.int32)


def make_scores_fn(logits_fn):
  """Compiled images -> (scores dict, predicted) of scores_from_logits."""
  return tf.function(lambda x: scores_from_logits(logits_fn(x)), reduce_retracing=True)


def score_batches(scores_fn, batches):
  """({score: float32 [N]}, predicted int32 [N], labels int32 [N]) over (images, labels) batches."""
  out, pred, labels = {k: [] for k in SCORES}, [], []
  for images, y in batches:
    s, p = scores_fn(images)
    for k in SCORES:
      out[k].append(s[k].numpy())
    pred.append(p.numpy())
    labels.append(np.asarray(y, np.int32))
  if not pred:
    raise ValueError('score_batches got no batches: the dataset is empty.')
  return (
    {k: np.concatenate(v) for k, v in out.items()},
    np.concatenate(pred),
    np.concatenate(labels),
  )


def fpr95_out_positive(in_scores, out_scores):
  """OpenOOD v1.5's FPR@95: out-set positive, scores negated (see the module docstring)."""
  in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
  return ood_metrics.fpr_at_tpr(-out_scores, -in_scores, tpr=0.95)


def detection_metrics(in_scores, out_scores):
  """{'auroc', 'fpr95_in_positive', 'fpr95_out_positive'} of one score on one out-set."""
  return {
    'auroc': ood_metrics.auroc(in_scores, out_scores),
    'fpr95_in_positive': ood_metrics.fpr_at_tpr(in_scores, out_scores, tpr=0.95),
    'fpr95_out_positive': fpr95_out_positive(in_scores, out_scores),
  }
