"""Evaluation configs for `python -m acet_tf.evaluate --config=configs/eval.py:<preset>[,runlocal]`.

Presets:
  paper   the paper's protocol (Table 1 and 2: one 200-step PGD from each noise image, 80-step
          PGD on test images), exactly what the binary does without --config.
  quick   minutes: plus the photo-patch out-set, scores side by side, adversarial noise from the
          paper's noise and from uniform noise and every out-set attacked (APGD 100 steps, the
          paper's PGD), worst case per point, IBP guaranteed metrics; 1,000 points.
  strong  the worst case of the follow-up papers (ProoD/GOOD protocol, on a CPU budget): APGD 200
          steps x 3 restarts, the paper's PGD and sign-PGD 200 steps x 5 restarts with a decaying
          step and APGD-T 100 steps against each of the 9 most likely classes (issue 22), from
          the paper's noise, uniform noise and the
          out-set images (GOOD's eps), IBP guaranteed metrics; full sets unless --max_examples.
`runlocal` shrinks any preset to a smoke run of seconds (32 points, 5-step attacks).

Every field can be overridden (`--config.attacks.apgd.steps=500`, `--config.max_examples=500`), and
the binary's older flags (`--sets`, `--max_examples`, `--table2_examples`, ...) override these
when given.
"""

import ml_collections
from ml_collections import config_dict

PRESETS = ('paper', 'quick', 'strong')


def _attack(kind, steps, restarts=1, step_fraction=None, random_start=True, schedule=(), targets=0):
  return ml_collections.ConfigDict(
    dict(
      kind=kind,
      steps=steps,
      restarts=restarts,
      step_fraction=config_dict.placeholder(float) if step_fraction is None else step_fraction,
      random_start=random_start,
      schedule=tuple(schedule),
      targets=targets,  # APGD-T: runs against the `targets` most likely classes (attack_spec).
    )
  )


def _shrink_schedule(schedule, steps):
  """Segments scaled to `steps` in total (the last takes the rest), each at least one step."""
  total = sum(n for n, _ in schedule)
  head = [(max(1, round(n * steps / total)), f) for n, f in schedule[:-1]]
  return (*head, (max(1, steps - sum(n for n, _ in head)), schedule[-1][1]))


def _parse(arg):
  words = [w.strip() for w in (arg or 'paper').split(',') if w.strip()]
  presets = [w for w in words if w in PRESETS]
  unknown = [w for w in words if w not in PRESETS and w != 'runlocal']
  if unknown or len(presets) != 1:
    raise ValueError(
      f'configs/eval.py takes one of {PRESETS} and optionally runlocal, e.g. '
      f"'strong,runlocal'; got {arg!r}."
    )
  return presets[0], 'runlocal' in words


def get_config(arg=None):
  preset, runlocal = _parse(arg)
  c = ml_collections.ConfigDict()
  c.preset = preset
  # The paper's protocol (acet_tf.evaluate.Settings defaults, docs/recipe.md).
  c.sets = ''  # Comma-separated; '' = default out-datasets, noise, adv_noise, adv_samples, table2.
  c.max_examples = config_dict.placeholder(int)  # None: full test set (10k LSUN / ImageNet-).
  c.batch_size = 500
  c.adv_noise_steps = 200
  c.adv_noise_restarts = 1
  c.adv_noise_eps = 0.3
  c.adv_noise_step_size = 0.0075
  c.adv_samples_steps = 80
  c.table2_examples = config_dict.placeholder(int)
  c.image_dirs = ''  # 'name=folder,name2=folder2': any folder of images as an out-set.
  # Beyond the paper: off.
  c.attacks = ml_collections.ConfigDict()  # {name: kind, steps, restarts, step_fraction, ...}.
  c.attacked_sets = ''  # 'adv_noise', 'out_sets' (every loaded out-set) or out-set keys.
  c.adv_noise_starts = 'noise,uniform'
  c.attacked_eps = config_dict.placeholder(float)  # None: GOOD's 0.3 / 0.03 / 0.01.
  c.attacked_max_examples = config_dict.placeholder(int)
  c.guaranteed = False
  # The paper's PGD as a worst-case attack: 200 steps of eps / 40 (0.0075 at eps 0.3).
  paper_pgd = _attack('pgd', 200, step_fraction=0.025)
  if preset in ('quick', 'strong'):
    c.sets = 'datasets,photos,noise,adv_noise,adv_samples,table2'
    c.attacked_sets = 'adv_noise,out_sets'
    c.guaranteed = True
    c.attacks.pgd = paper_pgd
  if preset == 'quick':
    c.max_examples = 1000
    c.attacks.apgd = _attack('apgd', 100)
  if preset == 'strong':
    c.attacks.apgd = _attack('apgd', 200, restarts=3)
    # Issue 22: sign-PGD with 5 restarts and a decaying step (0.03, 0.0075, 0.002 at eps 0.3)
    # beat APGD + the paper's PGD on the authors' CIFAR-100 ACET model (0.177 against 0.129).
    c.attacks.pgd_decay = _attack(
      'pgd', 200, restarts=5, schedule=((60, 0.1), (80, 0.025), (60, 1 / 150))
    )
    # AutoAttack's APGD-T: a run against each of the 9 most likely classes at the centre.
    c.attacks.apgd_t = _attack('apgd', 100, targets=9)
  if runlocal:
    c.max_examples = 32
    c.batch_size = 32
    c.adv_noise_steps = 5
    c.adv_samples_steps = 5
    c.table2_examples = 32
    for attack in c.attacks.values():
      if attack.schedule:
        attack.schedule = _shrink_schedule(attack.schedule, 5)
      attack.steps = sum(n for n, _ in attack.schedule) if attack.schedule else 5
      attack.restarts = 1
  return c
