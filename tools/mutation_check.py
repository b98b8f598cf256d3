"""Applies each listed mutation to a copy of the repository and says whether the tests catch it.

  python -m tools.mutation_check             # every mutation
  python -m tools.mutation_check ibp_bn_abs  # the named ones

A mutation is one exact string replacement in one source file (the string must occur exactly once,
so a refactoring that moves it fails loudly here instead of silently testing nothing). Each runs in
a fresh copy of the working tree (without .git) in a temporary directory, so the tree itself is
never modified, even if the run is interrupted. First the unmutated copy must pass the same tests.
Prints a table: mutation -> caught (the tests failed) / NOT caught, and exits 1 if any survived.
"""

import dataclasses
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str  # Source file, relative to the repository root.
  old: str
  new: str
  tests: tuple  # Test files (or node ids) that should catch it.
  what: str


IBP_TESTS = ('tests/robustness/test_ibp.py',)
APGD_TESTS = ('tests/robustness/test_apgd.py',)
PROOD_MODEL_TESTS = ('tests/models/test_prood.py',)
PROOD_BOUND_TESTS = ('tests/robustness/test_prood_bound.py',)

OUTLIER_TESTS = ('tests/training/test_outlier_methods.py',)

MUTATIONS = (
  Mutation(
    'prood_positive_weights',
    'acet_tf/models/prood.py',
    'return -tf.exp(tf.convert_to_tensor(self.log_weight))',
    'return tf.exp(tf.convert_to_tensor(self.log_weight))',
    PROOD_MODEL_TESTS,
    "discriminator's last layer without its sign: far away p(in) -> 1, no asymptotic guarantee",
  ),
  Mutation(
    'prood_bound_without_u',
    'acet_tf/models/prood.py',
    'return u + (1.0 - u) / float(num_classes)',
    'return (1.0 - u) / float(num_classes)',
    PROOD_BOUND_TESTS,
    "ProoD's certificate without the in-term u (p(y|x, in) <= 1 dropped)",
  ),
  Mutation(
    'prood_in_logit_lower_end',
    'acet_tf/robustness/ibp.py',
    '_, hi = logit_bounds(discriminator, *input_box(x, eps))',
    'hi, _ = logit_bounds(discriminator, *input_box(x, eps))',
    PROOD_BOUND_TESTS,
    "the in-logit's lower end taken as its upper bound",
  ),
  Mutation(
    'ibp_bn_abs',
    'acet_tf/robustness/ibp.py',
    'lambda r: r * tf.abs(scale)',
    'lambda r: r * scale',
    IBP_TESTS,
    'batch norm radius r * scale, not r * abs(scale) (wrong for negative gamma)',
  ),
  Mutation(
    'ibp_conv_abs',
    'acet_tf/robustness/ibp.py',
    'lambda r: tf.nn.conv2d(r, tf.abs(kernel), **kwargs)',
    'lambda r: tf.nn.conv2d(r, kernel, **kwargs)',
    IBP_TESTS,
    'convolution radius with the signed kernel',
  ),
  Mutation(
    'ibp_dense_abs',
    'acet_tf/robustness/ibp.py',
    'lambda r: tf.tensordot(r, tf.abs(kernel), 1)',
    'lambda r: tf.tensordot(r, kernel, 1)',
    IBP_TESTS,
    'dense radius with the signed kernel',
  ),
  Mutation(
    'ibp_relu_layer_no_clip',
    'acet_tf/robustness/ibp.py',
    "must be the plain max(x, 0).')\n  return tf.nn.relu(stacked)",
    "must be the plain max(x, 0).')\n  return stacked",
    IBP_TESTS,
    'ReLU layer passes the interval through unclipped',
  ),
  Mutation(
    'ibp_final_diff_abs',
    'acet_tf/robustness/ibp.py',
    'tf.abs(w[:, :, None] - w[:, None, :])',
    '(w[:, :, None] - w[:, None, :])',
    IBP_TESTS,
    "last layer's logit differences with signed weight differences",
  ),
  Mutation(
    'apgd_no_halving',
    'acet_tf/robustness/apgd.py',
    'eta = tf.where(reduce, 0.5 * eta, eta)',
    'eta = eta',
    APGD_TESTS,
    'step size never halved at the checkpoints',
  ),
  Mutation(
    'apgd_no_restart',
    'acet_tf/robustness/apgd.py',
    'x, g = _where(reduce, best_x, x), _where(reduce, best_g, g)',
    'x, g = x, g',
    APGD_TESTS,
    'no restart from the best point after a halving',
  ),
  Mutation(
    'apgd_momentum_1',
    'acet_tf/robustness/apgd.py',
    'MOMENTUM = 0.75',
    'MOMENTUM = 1.0',
    APGD_TESTS,
    'momentum 1.0: plain sign ascent with the step schedule',
  ),
  Mutation(
    'apgd_momentum_reset',
    'acet_tf/robustness/apgd.py',
    '    f_prev = tf.where(reduce, best_f, f_prev)',
    '    x_prev, f_prev = _where(reduce, best_x, x_prev), tf.where(reduce, best_f, f_prev)',
    APGD_TESTS,
    'momentum reset after a restart (x_prev := x_max; the rule before issue 22)',
  ),
  Mutation(
    'apgd_t_top1',
    'acet_tf/robustness/worst_case.py',
    'labels=top[:, t],',
    'labels=top[:, 0],',
    APGD_TESTS,
    'APGD-T aims every run at the class on top at the centre',
  ),
  Mutation(
    'apgd_t_untargeted',
    'acet_tf/robustness/worst_case.py',
    '        pgd.targeted_log_confidence_objective,',
    '        objective,',
    APGD_TESTS,
    "APGD-T's runs climb the max log-confidence, not their target class",
  ),
  Mutation(
    'good_largest_bounds',
    'acet_tf/training/train_step.py',
    'take = rank < num_bound',
    'take = rank >= num_bound',
    OUTLIER_TESTS,
    "GOOD_Q's bound loss on the points with the largest bounds, not the smallest",
  ),
  Mutation(
    'oe_sign',
    'acet_tf/ops/losses.py',
    'return tf.reduce_logsumexp(z, axis=-1) - tf.reduce_mean(z, axis=-1)',
    'return tf.reduce_mean(z, axis=-1) - tf.reduce_logsumexp(z, axis=-1)',
    OUTLIER_TESTS,
    "OE's uniform cross-entropy with the wrong sign",
  ),
)


def _copy_tree(dst):
  ignore = shutil.ignore_patterns('.git', '__pycache__', '.pytest_cache', '.hypothesis', 'runs')
  shutil.copytree(ROOT, dst, ignore=ignore)


def _run_tests(tree, tests):
  """True if the tests pass in `tree`; the fast tier only, stopping at the first failure."""
  cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-m', 'not slow', '-p', 'no:cacheprovider']
  proc = subprocess.run(cmd + list(tests), cwd=tree, capture_output=True, text=True)
  return proc.returncode == 0, proc.stdout.strip().splitlines()[-1:] or ['']


def _mutate(tree, m):
  path = pathlib.Path(tree) / m.path
  text = path.read_text()
  count = text.count(m.old)
  if count != 1:
    raise ValueError(f'{m.name}: {m.old!r} occurs {count} times in {m.path}, expected once.')
  path.write_text(text.replace(m.old, m.new))


def main(argv):
  names = argv[1:]
  unknown = set(names) - {m.name for m in MUTATIONS}
  if unknown:
    raise SystemExit(f'unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}')
  chosen = [m for m in MUTATIONS if not names or m.name in names]
  rows = []
  with tempfile.TemporaryDirectory(prefix='mutation_check_') as tmp:
    baseline = pathlib.Path(tmp) / 'baseline'
    _copy_tree(baseline)
    for tests in sorted({m.tests for m in chosen}):
      ok, tail = _run_tests(baseline, tests)
      if not ok:
        raise SystemExit(f'unmutated tests fail ({" ".join(tests)}): {tail[0]}')
    for m in chosen:
      tree = pathlib.Path(tmp) / m.name
      _copy_tree(tree)
      _mutate(tree, m)
      t = time.time()
      passed, tail = _run_tests(tree, m.tests)
      rows.append((m, not passed, time.time() - t, tail[0]))
      shutil.rmtree(tree)
      print(f'{m.name}: {"caught" if not passed else "NOT caught"} ({tail[0]})', flush=True)
  print()
  print('| mutation | file | change | tests | result | seconds |')
  print('|---|---|---|---|---|---|')
  for m, caught, seconds, _ in rows:
    result = 'caught' if caught else '**NOT caught**'
    print(f'| {m.name} | {m.path} | {m.what} | {" ".join(m.tests)} | {result} | {seconds:.0f} |')
  return 0 if all(caught for _, caught, _, _ in rows) else 1


if __name__ == '__main__':
  sys.exit(main(sys.argv))
