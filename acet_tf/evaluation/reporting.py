"""What an evaluation reports: the results dict's header, table.md (Table 1 as in the paper, the
attacked sets, the scores, Table 2), the TensorBoard scalars and the files of write_outputs
(results.json, table.md, confidence_histograms.png, roc_curves.png, image_grid.png, summaries).
"""

import dataclasses
import json
import os
import platform
import subprocess

from absl import logging
import keras
import matplotlib
import numpy as np
import scipy
import tensorflow as tf
import tensorflow_datasets as tfds

from acet_tf.artifacts import runs
from acet_tf.data import input_pipeline
from acet_tf.data import out_datasets
from acet_tf.evaluation import alpha_search
from acet_tf.evaluation import plots
from acet_tf.evaluation import predictions as predictions_lib
from acet_tf.evaluation import robust_metrics
from acet_tf.evaluation import scores as scores_lib
from acet_tf.evaluation import settings as settings_lib

SET_TITLES = {
  'noise': 'Noise',
  'adv_noise': 'Adv. Noise',
  'adv_samples': 'Adv. Samples',
  settings_lib.TABLE2: 'Table 2',
}
DATASET_TITLES = {
  'mnist': 'MNIST',
  input_pipeline.MNIST5K: 'MNIST-5k',
  'svhn_cropped': 'SVHN',
  'cifar10': 'CIFAR-10',
  'cifar100': 'CIFAR-100',
}

UNIFORM_ONLY = 'uniform start only'

DEFINITIONS = {
  'mmc': 'mean over the points of max_k softmax_k.',
  'auroc': 'exact area under the ROC curve of test set (positive) vs out-set (negative) by '
  'confidence, from ranks with ties counted 1/2.',
  'fpr95': 'reference definition: threshold = 5th percentile of the test-set confidences '
  '(numpy linear interpolation); FPR = share of out-set points with confidence >= '
  'threshold.',
  'aupr_in': 'average precision with the test set as positive (sklearn definition).',
  'aupr_out': 'average precision with the out-set as positive and the confidences negated.',
  'adv_samples': 'PGD on the test set maximising the cross-entropy of the true label. An attack '
  'succeeded unless the true class is still the argmax with probability > '
  '1.01/K (the reference rule). MMC, AUROC, FPR@95 and AUPR use the successful '
  'adversarial samples only, as the reference did; mmc_all is over all of them.',
  'adv_noise': 'PGD from each noise image maximising the max log-confidence (eq. 3); per image '
  'the best point over all iterates and restarts.',
  'noise': 'the training p_out: permuted test images / uniform noise, Gaussian low-pass, '
  'min-max rescale (one per test image).',
  'table2': 'uniform noise x in [0,1]^d; per draw the smallest alpha >= 1 with max softmax '
  'f(alpha x) >= threshold by a geometric grid and bisection (inf if not reached up '
  'to alpha_max); share_overconfident_clipped = share of draws with confidence > '
  'clipped_threshold on clip(alpha x, 0, 1), alpha_max for the unreached draws.',
}


def new_results(info, settings, noise_config, *, step, description, skipped):
  """The results dict before any unit ran: the model, settings, definitions, seeds, versions.

  Args:
    info: input_pipeline.DatasetInfo of the in-distribution set.
    settings: settings_lib.Settings (seed set).
    noise_config: the p_out settings (ConfigDict or dict).
    step: the model's training step; description: facts about the model copied into 'model'.
    skipped: {key: reason}, kept (the units add to it) as results['skipped'].
  """
  return {
    'model': dict(
      description or {},
      step=int(step),
      dataset=info.name,
      image_shape=list(info.image_shape),
      num_classes=info.num_classes,
      class_names=list(info.class_names),
    ),
    'settings': dataclasses.asdict(settings),
    'definitions': dict(DEFINITIONS),  # A copy: the scores unit adds its own.
    'seeds': {
      'base': settings.seed,
      'streams': {
        'noise': predictions_lib.NOISE_STREAM,
        'adv_noise': predictions_lib.ADV_NOISE_STREAM,
        'adv_samples': predictions_lib.ADV_SAMPLES_STREAM,
        'table2': alpha_search.TABLE2_STREAM,
        'uniform': robust_metrics.UNIFORM_STREAM,
        'attacked': robust_metrics.ATTACKED_STREAM,
      },
      'rule': (
        'batch_random.step_seed(base, step=-1, stream), folded in per batch; an attacked set '
        'folds in robust_eval.name_hash(its name), SHA-256 of the whole name'
      ),
    },
    'noise_config': json.loads(noise_config.to_json())
    if hasattr(noise_config, 'to_json')
    else dict(noise_config),
    'versions': versions(),
    'out_sets': {},
    'skipped': skipped,
    'timing': {},
  }


def per_class_metrics(pred, class_names):
  """{class name: {'num_examples', 'error', 'mmc', 'predicted'}} on the test set, in class order.

  'error' is over the test images of that class; 'predicted' counts the test images predicted as
  that class; 'mmc' is the mean confidence on the images of the class (None without images).
  """
  labels, predicted = np.asarray(pred.labels), np.asarray(pred.predicted)
  confidence = np.asarray(pred.confidence)
  table = {}
  for k, name in enumerate(class_names):
    mine = labels == k
    n = int(mine.sum())
    table[str(name)] = {
      'num_examples': n,
      'error': float((predicted[mine] != k).mean()) if n else None,
      'mmc': float(confidence[mine].mean()) if n else None,
      'predicted': int((predicted == k).sum()),
    }
  return table


def versions():
  """Library versions and the git commit of the code, for results.json."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {
    'python': platform.python_version(),
    'tensorflow': tf.__version__,
    'keras': keras.__version__,
    'numpy': np.__version__,
    'scipy': scipy.__version__,
    'tensorflow_datasets': tfds.__version__,
    'matplotlib': matplotlib.__version__,
    'git_commit': commit,
  }


def json_safe(value):
  """Non-finite floats as the strings 'inf', '-inf', 'nan' (strict JSON has no such numbers)."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (float, np.floating)):
    value = float(value)
    return value if np.isfinite(value) else str(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def noise_title(key, results):
  """Title of 'noise' or 'adv_noise', saying when it is uniform noise only (no test images)."""
  if 'noise' in results.get('data_free', {}):
    return f'{SET_TITLES[key]} ({UNIFORM_ONLY})'
  return SET_TITLES[key]


def set_title(key):
  """Title of a set key in tables and plots: the out-set's, SET_TITLES', else the key itself."""
  if key in out_datasets.OUT_SETS:
    return out_datasets.OUT_SETS[key].title
  return SET_TITLES.get(key, key)


def fmt(value, digits=3):
  """A metric in a table or log line; '–' for None (not computed)."""
  return '–' if value is None else f'{value:.{digits}f}'


def fmt_alpha(value, alpha_max):
  """A Table 2 alpha; '> alpha_max' when it was never reached (inf)."""
  return f'> {alpha_max:g}' if not np.isfinite(value) else f'{value:.4g}'


def format_table(results):
  """table.md: Table 1 as in the paper (MMC / AUROC / FPR@95 per out-set, plus AUPR) and Table 2."""
  model, test = results['model'], results['test']
  name = DATASET_TITLES.get(model['dataset'], model['dataset'])
  method = (model.get('method') or 'model').upper() if model.get('method') != 'plain' else 'Plain'
  if test is None:  # Data-free: no test row (results['data_free'] says why).
    test = {'error': None, 'mmc': None, 'num_examples': 0}
  te = '–' if test['error'] is None else f'{100 * test["error"]:.2f}%'
  lines = [
    f'# Evaluation: {method} {model.get("model", "")} on {name}'.rstrip(),
    '',
    f'Source: {model.get("source", "?")} `{model.get("path", "")}`, training step {model["step"]}.',
    '',
    '## Table 1',
    '',
    f'| Trained on {name} — {method} (TE: {te}) | N | MMC | AUROC | FPR@95 | AUPR-in | AUPR-out |',
    '|---|---:|---:|---:|---:|---:|---:|',
    f'| {name} (test) | {test["num_examples"] or "not run"} | {fmt(test["mmc"])} | – | – | – | – |',
  ]
  for key, e in results['out_sets'].items():
    title = e.get('title', key)
    n = str(e['num_examples'])
    if key == 'adv_samples':
      title += ' ¹'
      n = f'{e["num_successful"]} of {e["num_attacked"]}'
    lines.append(
      f'| {title} | {n} | {fmt(e["mmc"])} | {fmt(e["auroc"])} | {fmt(e["fpr95"])} '
      f'| {fmt(e["aupr_in"])} | {fmt(e["aupr_out"])} |'
    )
  lines.append('')
  if test['num_examples']:
    lines.append(
      f'Test error {te}, test MMC {test["mmc"]:.3f} over {test["num_examples"]} test images.'
    )
  if results.get('data_free'):
    lines.append('Not run without the in-distribution data:')
    lines += [f'- {key}: {note}' for key, note in results['data_free'].items()]
  if test.get('per_class'):
    lines += [
      '',
      '## Test set per class',
      '',
      '| class | N | error | MMC | predicted as |',
      '|---|---:|---:|---:|---:|',
    ]
    for name, e in test['per_class'].items():
      error = '–' if e['error'] is None else f'{100 * e["error"]:.2f}%'
      lines.append(
        f'| {name} | {e["num_examples"]} | {error} | {fmt(e["mmc"])} | {e["predicted"]} |'
      )
  if results['skipped']:
    lines.append('')
    lines.append('Skipped (not evaluated):')
    for key, reason in results['skipped'].items():
      lines.append(f'- {set_title(key)}: {reason}')
  lines.append('')
  notes = []
  if 'adv_samples' in results['out_sets']:
    e = results['out_sets']['adv_samples']
    notes.append(
      f'¹ Adversarial samples: PGD {e["steps"]} steps of {e["step_size"]:g} in the L-inf ball '
      f"eps {e['eps']:g} on {e['num_attacked']} test images, maximising the true label's "
      f'cross-entropy; success rate {100 * e["success_rate"]:.1f}%. MMC, AUROC, FPR@95 and AUPR '
      f'are over the {e["num_successful"]} successful adversarial samples only, as the '
      f'reference did (an attack fails only if the true class stays the argmax with probability '
      f'> 1.01/K). MMC over all of them: {e["mmc_all"]:.3f}.'
    )
  if 'adv_noise' in results['out_sets']:
    e = results['out_sets']['adv_noise']
    notes.append(
      f'Adv. noise: PGD {e["steps"]} steps of {e["step_size"]:g}, eps {e["eps"]:g}, '
      f'{e["restarts"]} restart(s), maximising the max log-confidence from each noise image.'
    )
  notes.append('FPR@95: ' + DEFINITIONS['fpr95'] + ' AUROC: ' + DEFINITIONS['auroc'])
  lines.append('\n\n'.join(notes))
  lines += _robust_table(results)
  if 'table2' in results:
    t2 = results['table2']
    lines += [
      '',
      '## Table 2',
      '',
      f'Uniform noise x in [0,1]^d scaled by alpha >= 1; {t2["num_examples"]} draws.',
      '',
      f'| median alpha (conf >= {t2["threshold"]:g}) | q25 | q75 | never reached up to '
      f'{t2["alpha_max"]:g} | % overconfident after clipping (> {t2["clipped_threshold"]:g}) |',
      '|---:|---:|---:|---:|---:|',
      f'| {fmt_alpha(t2["median"], t2["alpha_max"])} | {fmt_alpha(t2["q25"], t2["alpha_max"])} '
      f'| {fmt_alpha(t2["q75"], t2["alpha_max"])} | {100 * t2["share_unreached"]:.1f}% | '
      f'{100 * t2["share_overconfident_clipped"]:.1f}% |',
      '',
      'Search: ' + DEFINITIONS['table2'],
    ]
  return '\n'.join(lines) + '\n'


def _robust_table(results):
  """table.md lines of the attacked sets (worst case, per attack, guaranteed) and the scores."""
  lines = []
  if results.get('attacked'):
    lines += [
      '',
      '## Worst case over attacks, per start distribution; certified (IBP) bounds',
      '',
      '| Attacked set | start | eps | N | worst-case MMC | AUROC | FPR@95 | guaranteed MMC | '
      'guaranteed AUROC | guaranteed FPR@95 |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for key, e in results['attacked'].items():
      rows = [(start, e.get('worst_case', {}).get(start, {})) for start in e['starts']]
      if 'pooled_worst_case' in e or 'pooled' in e.get('guaranteed', {}):
        rows.append(('pooled (max over starts)', e.get('pooled_worst_case', {})))
      for start, w in rows:
        g = e.get('guaranteed', {}).get('pooled' if start.startswith('pooled') else start, {})
        n = w.get('num_examples', g.get('num_examples', 0))
        lines.append(
          f'| {set_title(key)} | {start} | {e["eps"]:g} | {n} | {fmt(w.get("mmc"))} | '
          f'{fmt(w.get("auroc"))} | {fmt(w.get("fpr95"))} | {fmt(g.get("mmc"))} | '
          f'{fmt(g.get("auroc"))} | {fmt(g.get("fpr95"))} |'
        )
    lines += [
      '',
      "Per attack (`attack@start`; MMC / AUROC; a start's worst case is the per-point maximum "
      'over the clean point `clean@start` and every attack from that start):',
      '',
    ]
    for key, e in results['attacked'].items():
      parts = [f'{k} {fmt(a["mmc"])} / {fmt(a["auroc"])}' for k, a in e.get('attacks', {}).items()]
      if parts:
        lines.append(f'- {set_title(key)}: ' + '; '.join(parts))
    lines += [
      '',
      'AUROC and FPR@95 (in-distribution positive) of the clean test confidences '
      'against the worst-case confidences, resp. against the IBP upper bounds.',
    ]
  if results.get('scores'):
    lines += [
      '',
      '## Scores side by side',
      '',
      'AUROC / FPR@95 with the in-distribution positive (the paper) / FPR@95 with the '
      'out-distribution positive (OpenOOD v1.5), on the same forward passes.',
      '',
      '| Out-set | ' + ' | '.join(scores_lib.SCORES) + ' |',
      '|---|' + '---:|' * len(scores_lib.SCORES),
    ]
    for key, per_score in results['scores'].items():
      cells = [
        f'{fmt(m["auroc"])} / {fmt(m["fpr95_in_positive"])} / {fmt(m["fpr95_out_positive"])}'
        for m in per_score.values()
      ]
      lines.append(f'| {set_title(key)} | ' + ' | '.join(cells) + ' |')
  return lines


def summary_scalars(results):
  """{TensorBoard tag: value} of every scalar in the results."""
  scalars = {}
  if results['test'] is not None:
    scalars = {'eval/test/error': results['test']['error'], 'eval/test/mmc': results['test']['mmc']}
  for key, e in results['out_sets'].items():
    for m in ('mmc', 'auroc', 'fpr95', 'aupr_in', 'aupr_out', 'success_rate', 'mmc_all'):
      if e.get(m) is not None:
        scalars[f'eval/{key}/{m}'] = e[m]
  for key, e in results.get('attacked', {}).items():
    worst = dict(e.get('worst_case', {}))
    if 'pooled_worst_case' in e:
      worst['pooled'] = e['pooled_worst_case']
    for start, w in worst.items():
      for m in ('mmc', 'auroc', 'fpr95'):
        if w.get(m) is not None:  # None: data-free, no AUROC.
          scalars[f'eval/attacked/{key}/{start}/worst_case/{m}'] = w[m]
    for start, g in e.get('guaranteed', {}).items():  # 'pooled' among them with several starts.
      for m in ('mmc', 'auroc', 'fpr95'):
        if g.get(m) is not None:
          scalars[f'eval/attacked/{key}/{start}/guaranteed_{m}'] = g[m]
  if 'table2' in results:
    t2 = results['table2']
    scalars.update(
      {
        'table2/median_alpha': t2['median'],
        'table2/q25_alpha': t2['q25'],
        'table2/q75_alpha': t2['q75'],
        'table2/share_unreached': t2['share_unreached'],
        'table2/share_overconfident_clipped': t2['share_overconfident_clipped'],
      }
    )
  return scalars


def write_outputs(results, output_dir, *, confidences, titles, grid, class_names, step):
  """results.json, table.md, the PNGs and TensorBoard summaries in `output_dir`."""
  tf.io.gfile.makedirs(output_dir)
  name = DATASET_TITLES.get(results['model']['dataset'], results['model']['dataset'])
  label = f'{results["model"].get("method", "")} {name}'.strip()
  pngs = {}
  if confidences:  # None for Table 2 alone without the test set.
    pngs['confidence_histograms'] = os.path.join(output_dir, 'confidence_histograms.png')
    plots.confidence_histograms(
      {titles[k]: v for k, v in confidences.items()},
      pngs['confidence_histograms'],
      title=f'Confidences: {label}',
      num_classes=len(class_names),
    )
  out = {titles[k]: v for k, v in confidences.items() if k != 'test'}
  if out and 'test' in confidences:
    pngs['roc_curves'] = os.path.join(output_dir, 'roc_curves.png')
    plots.roc_curves(confidences['test'], out, pngs['roc_curves'], title=f'ROC: {label}')
  row_titles = {
    'test': titles['test'],
    'noise': 'Noise',
    'adv_noise': 'Adv. noise',
    'adv_samples': 'Adv. samples',
  }
  if grid:
    pngs['image_grid'] = os.path.join(output_dir, 'image_grid.png')
    plots.image_grid(
      {row_titles[k]: v for k, v in grid.items()},
      class_names,
      pngs['image_grid'],
      title=f'Predicted class and confidence: {label}',
    )
  results['files'] = {k: os.path.basename(v) for k, v in pngs.items()}
  results['files'].update(results='results.json', table='table.md')

  with tf.io.gfile.GFile(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write(format_table(results))
  runs.write_json(os.path.join(output_dir, 'results.json'), json_safe(results))

  writer = tf.summary.create_file_writer(output_dir)
  with writer.as_default(step=int(step)):
    for tag, value in summary_scalars(results).items():
      tf.summary.scalar(tag, value)
    for key, row in grid.items():
      tf.summary.image(f'eval/images/{key}', row[0], max_outputs=len(row[0]))
    for key, path in pngs.items():
      with tf.io.gfile.GFile(path, 'rb') as f:
        image = tf.io.decode_png(f.read(), channels=4)
      tf.summary.image(f'eval/plots/{key}', image[None], max_outputs=1)
    tf.summary.text('eval/table', format_table(results))
  writer.flush()
  writer.close()
  logging.info('Wrote %s', ', '.join(sorted(results['files'].values())) + f' to {output_dir}')
