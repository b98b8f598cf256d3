"""The README table of the authors' nine models from tools/paper_models.sh's output directory.

  python -m tools.paper_models_table --out=/tmp/paper_models

Reads OUT/eval_table2/<name>/results.json (acet_tf), OUT/oracle_<name>.json (the authors' graph)
and OUT/eval_adv_noise/<name>/results.json, and prints a Markdown table beside the paper's values.
"""

import json
import os

from absl import app
from absl import flags

# The paper's numbers (paper.txt): Table 2 first and second row (no CEDA column there) and
# Table 1's adversarial-noise MMC.
PAPER_TABLE2 = {
  'svhn_plain': (28.1, 99.9),
  'cifar10_plain': (8.1, 99.9),
  'cifar100_plain': (9.9, 99.8),
  'svhn_acet': (49.8, 50.2),
  'cifar10_acet': (45.3, 3.4),
  'cifar100_acet': (9.9, 0.0),
}
PAPER_ADV_NOISE = {
  'svhn_plain': 1.000,
  'svhn_ceda': 0.946,
  'svhn_acet': 0.101,
  'cifar10_plain': 1.000,
  'cifar10_ceda': 0.985,
  'cifar10_acet': 0.112,
  'cifar100_plain': 1.000,
  'cifar100_ceda': 0.985,
  'cifar100_acet': 0.013,
}
NAMES = [f'{d}_{m}' for d in ('svhn', 'cifar10', 'cifar100') for m in ('plain', 'ceda', 'acet')]

_OUT = flags.DEFINE_string('out', None, 'OUT_DIR of tools/paper_models.sh.')


def _read(path):
  if not os.path.exists(path) or not os.path.getsize(path):
    return None
  with open(path) as f:
    return json.load(f)


def rows(out):
  """One dict per model with every number of the table (None where not measured)."""
  result = []
  for name in NAMES:
    ours = _read(os.path.join(out, 'eval_table2', name, 'results.json'))
    oracle = _read(os.path.join(out, f'oracle_{name}.json'))
    adv = _read(os.path.join(out, 'eval_adv_noise', name, 'results.json'))
    t2 = ours and ours.get('table2')
    result.append(
      {
        'name': name,
        'draws': t2 and t2['num_examples'],
        'alpha': t2 and float(t2['median']),
        'alpha_oracle': oracle and float(oracle['median']),
        'alpha_paper': PAPER_TABLE2.get(name, (None, None))[0],
        'clipped': t2 and 100 * t2['share_overconfident_clipped'],
        'clipped_paper': PAPER_TABLE2.get(name, (None, None))[1],
        'table2_s': t2 and t2['seconds'],
        'oracle_s': oracle and oracle['seconds'],
        'adv_points': adv and adv['out_sets']['adv_noise']['num_examples'],
        'adv_mmc': adv and adv['out_sets']['adv_noise']['mmc'],
        'adv_paper': PAPER_ADV_NOISE[name],
        'adv_s': adv and adv['out_sets']['adv_noise']['seconds'],
      }
    )
  return result


def _f(value, fmt):
  return '–' if value is None else format(value, fmt)


def markdown(table):
  lines = [
    "| model | median α acet_tf | median α authors' graph | median α paper | "
    '% overconf. clipped (ours / paper) | adv. noise MMC (ours / paper) | wall s (T2, '
    'graph T2, adv.) |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for r in table:
    lines.append(
      f'| {r["name"]} | {_f(r["alpha"], ".3g")} | {_f(r["alpha_oracle"], ".3g")} | '
      f'{_f(r["alpha_paper"], "")} | {_f(r["clipped"], ".1f")} / {_f(r["clipped_paper"], "")} '
      f'| {_f(r["adv_mmc"], ".3f")} / {r["adv_paper"]:.3f} | {_f(r["table2_s"], ".0f")}, '
      f'{_f(r["oracle_s"], ".0f")}, {_f(r["adv_s"], ".0f")} |'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  table = rows(_OUT.value)
  print(markdown(table))
  for r in table:
    if r['alpha'] and r['alpha_oracle']:
      print(
        f'{r["name"]}: acet_tf / graph median alpha - 1 = {r["alpha"] / r["alpha_oracle"] - 1:+.2%}'
      )


if __name__ == '__main__':
  app.run(main)
