"""Prints the README's per-model table of the evaluation beyond the paper from results.json files.

  python -m tools.robust_table NAME=RESULTS_JSON [NAME=RESULTS_JSON ...]

Columns, each start distribution on its own (results.json's per-start keys): adversarial-noise MMC
under the paper's attack (on the same N noise points; for data-free runs the paper row itself),
under the worst case from the noise images (and the gap) and from uniform noise, the attacked
photo-patch AUROC (worst case), the guaranteed AUROC from noise, from uniform noise and of the
photo patches, and the wall time of the whole evaluation.
"""

import json
import sys


def _get(d, *keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _f(x):
  return '–' if x is None else f'{x:.3f}'


def row(name, results):
  adv = _get(results, 'attacked', 'adv_noise') or {}
  # The paper's attack on the same (first N) noise images as the noise start's worst case.
  paper = _get(adv, 'attacks', 'paper@noise', 'mmc')
  if paper is None:  # Data-free runs attack uniform starts only; the paper row is its own.
    paper = _get(results, 'out_sets', 'adv_noise', 'mmc')
  worst = _get(adv, 'worst_case', 'noise', 'mmc')
  uniform = _get(adv, 'worst_case', 'uniform', 'mmc')
  gap = None if paper is None or worst is None else worst - paper
  n = _get(adv, 'worst_case', 'noise', 'num_examples') or _get(
    adv, 'worst_case', 'uniform', 'num_examples'
  )
  return (
    f'| {name} | {n} | {_f(paper)} | {_f(worst)} | {_f(gap)} | {_f(uniform)} | '
    f'{_f(_get(results, "out_sets", "photos", "auroc"))} | '
    f'{_f(_get(results, "attacked", "photos", "worst_case", "image", "auroc"))} | '
    f'{_f(_get(adv, "guaranteed", "noise", "auroc"))} | '
    f'{_f(_get(adv, "guaranteed", "uniform", "auroc"))} | '
    f'{_f(_get(results, "attacked", "photos", "guaranteed", "image", "auroc"))} | '
    f'{results["timing"]["total"] / 60:.1f} min |'
  )


def main(argv):
  print(
    '| model | N | adv. noise MMC, paper attack | worst case from noise | gap | worst case from '
    'uniform | photos AUROC clean | photos AUROC attacked | guaranteed AUROC noise | guaranteed '
    'AUROC uniform | guaranteed AUROC photos | wall time |'
  )
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for arg in argv:
    name, _, path = arg.partition('=')
    with open(path) as f:
      print(row(name, json.load(f)))


if __name__ == '__main__':
  main(sys.argv[1:])
