"""What an evaluation evaluates and how: Settings, from an evaluation config (configs/eval.py) or
from a training run's config (its periodic evaluation), and which sets they select.

Set names: the generated sets GENERATED_SETS ('noise', 'adv_noise', 'adv_samples'), TABLE2,
DATASETS (the default out-datasets of the in-distribution set), out_datasets.OUT_SETS keys and the
keys of Settings.image_dirs.
"""

import dataclasses

from acet_tf.data import out_datasets
from acet_tf.robustness import attack_spec

GENERATED_SETS = ('noise', 'adv_noise', 'adv_samples')
ADV_NOISE_STARTS = ('noise', 'uniform')  # Centres of the attacked adversarial noise.
ATTACK_ALL_OUT_SETS = 'out_sets'  # In attacked_sets: every out-set that was loaded.
TABLE2 = 'table2'
TABLE2_DEFAULT_EXAMPLES = 10_000  # The paper's number of uniform draws.
DATASETS = 'datasets'  # In --sets: the default out-datasets of the in-distribution set.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to evaluate and how. Defaults: the paper's protocol (docs/recipe.md)."""

  sets: tuple[str, ...] = ()  # Empty: every default set. Else names of GENERATED_SETS, TABLE2,
  #                             DATASETS and out_datasets.OUT_SETS.
  max_examples: int | None = None  # Caps every set (None: full test set, 10k for LSUN/ImageNet-).
  batch_size: int = 500
  adv_noise_steps: int = 200
  adv_noise_restarts: int = 1
  adv_noise_eps: float = 0.3
  adv_noise_step_size: float = 0.0075
  adv_noise_examples: int | None = None  # Attacked noise images: the first ones; None: all.
  adv_samples_steps: int = 80
  adv_samples_eps: float | None = None  # None: 0.3 for 28x28 images, else 0.1.
  adv_samples_step_size: float | None = None  # None: 0.0075 for 28x28 images, else 0.0025.
  table2_examples: int | None = None  # None: 10,000, or max_examples if smaller.
  table2_threshold: float = 0.999
  table2_alpha_max: float = 1e6
  table2_clipped_threshold: float = 0.95
  strict: bool = False  # An out-set that cannot be loaded is an error instead of a skip.
  data_dir: str = ''  # TFDS data_dir of the out-sets ('' = the run's, else the TFDS default).
  imagenet_minus_dir: str = ''
  seed: int | None = None  # None: the run's config.seed (0 without a config).
  num_grid_images: int = 8
  # Beyond the paper (robust_eval); the defaults switch all of it off.
  attacks: tuple = ()  # attack_spec.Attack, run on every attacked set.
  attacked_sets: tuple[str, ...] = ()  # 'adv_noise', ATTACK_ALL_OUT_SETS or out-set keys.
  adv_noise_starts: tuple[str, ...] = ADV_NOISE_STARTS  # Centres of attacked adv. noise.
  attacked_eps: float | None = None  # Out-sets; None: GOOD's radius (0.3 / 0.03 / 0.01).
  attacked_max_examples: int | None = None  # Points per attacked set; None: max_examples.
  guaranteed: bool = False  # IBP upper bounds on every attacked set (Keras models only).
  image_dirs: tuple[tuple[str, str], ...] = ()  # (key, folder): any folder as an out-set.

  def __post_init__(self):
    def check(ok, message):
      if not ok:
        raise ValueError(f'Bad evaluation setting: {message}')

    check(
      self.max_examples is None or self.max_examples > 0,
      f'max_examples must be > 0, got {self.max_examples}',
    )
    check(self.batch_size > 0, f'batch_size must be > 0, got {self.batch_size}')
    for key in ('adv_noise_steps', 'adv_samples_steps'):
      check(getattr(self, key) >= 0, f'{key} must be >= 0, got {getattr(self, key)}')
    check(
      self.adv_noise_restarts >= 1,
      f'adv_noise_restarts must be >= 1, got {self.adv_noise_restarts}',
    )
    for key in ('adv_noise_examples', 'table2_examples'):
      value = getattr(self, key)
      check(value is None or value > 0, f'{key} must be > 0, got {value}')
    check(self.num_grid_images > 0, f'num_grid_images must be > 0, got {self.num_grid_images}')
    for key in ('adv_noise_eps', 'adv_noise_step_size', 'adv_samples_eps', 'adv_samples_step_size'):
      value = getattr(self, key)
      check(value is None or value > 0, f'{key} must be > 0, got {value}')
    folders = {k for k, _ in self.image_dirs}
    known = set(GENERATED_SETS) | {TABLE2, DATASETS} | set(out_datasets.OUT_SETS) | folders
    unknown = [s for s in self.sets if s not in known]
    check(not unknown, f'unknown sets {unknown}; choose from {", ".join(sorted(known))}')
    attackable = {'adv_noise', ATTACK_ALL_OUT_SETS} | set(out_datasets.OUT_SETS) | folders
    unknown = [s for s in self.attacked_sets if s not in attackable]
    check(
      not unknown, f'unknown attacked_sets {unknown}; choose from {", ".join(sorted(attackable))}'
    )
    check(
      not self.attacked_sets or self.attacks or self.guaranteed,
      'attacked_sets need attacks or guaranteed=True',
    )
    bad = [s for s in self.adv_noise_starts if s not in ADV_NOISE_STARTS]
    check(
      self.adv_noise_starts and not bad,
      f'adv_noise_starts must be a non-empty subset of {ADV_NOISE_STARTS}, got '
      f'{self.adv_noise_starts}',
    )
    check(
      self.attacked_eps is None or self.attacked_eps > 0,
      f'attacked_eps must be > 0, got {self.attacked_eps}',
    )
    check(
      self.attacked_max_examples is None or self.attacked_max_examples > 0,
      f'attacked_max_examples must be > 0, got {self.attacked_max_examples}',
    )
    names = [a.name for a in self.attacks]
    check(len(set(names)) == len(names), f'attack names must be distinct, got {names}')


def _split_list(text):
  return tuple(w.strip() for w in (text or '').split(',') if w.strip())


def parse_image_dirs(entries):
  """('name=folder', ...) -> (('name', 'folder'), ...); refuses entries without both parts."""
  out = []
  for entry in entries:
    key, sep, folder = entry.partition('=')
    if not sep or not key.strip() or not folder.strip():
      raise ValueError(f'image_dirs entries are name=folder, got {entry!r}')
    out.append((key.strip(), folder.strip()))
  return tuple(out)


def settings_from_config(config, **overrides):
  """Settings from an evaluation config (configs/eval.py) plus explicit overrides.

  Args:
    config: ConfigDict (or dict) with the fields of configs/eval.py.
    **overrides: Settings fields that win over the config (the binary's flags that were given).
  """
  c = dict(config)
  attack_list = tuple(
    attack_spec.Attack(
      name,
      a['kind'],
      int(a['steps']),
      restarts=int(a['restarts']),
      step_fraction=a.get('step_fraction'),
      random_start=bool(a.get('random_start', True)),
      schedule=tuple(tuple(s) for s in (a.get('schedule') or ())),
      targets=int(a.get('targets', 0)),
    )
    for name, a in dict(c.get('attacks') or {}).items()
  )
  fields = dict(
    sets=_split_list(c['sets']),
    max_examples=c['max_examples'],
    batch_size=c['batch_size'],
    adv_noise_steps=c['adv_noise_steps'],
    adv_noise_restarts=c['adv_noise_restarts'],
    adv_noise_eps=c['adv_noise_eps'],
    adv_noise_step_size=c['adv_noise_step_size'],
    adv_samples_steps=c['adv_samples_steps'],
    table2_examples=c['table2_examples'],
    image_dirs=parse_image_dirs(_split_list(c.get('image_dirs', ''))),
    attacks=attack_list,
    attacked_sets=_split_list(c.get('attacked_sets', '')),
    adv_noise_starts=_split_list(c.get('adv_noise_starts', 'noise,uniform')),
    attacked_eps=c.get('attacked_eps'),
    attacked_max_examples=c.get('attacked_max_examples'),
    guaranteed=bool(c.get('guaranteed', False)),
  )
  fields.update(overrides)
  return Settings(**fields)


def adv_samples_budget(settings, image_shape):
  """(eps, step_size) of the adversarial-sample attack: 0.3/0.0075 for 28x28, else 0.1/0.0025."""
  small = tuple(image_shape[:2]) == (28, 28)
  eps = settings.adv_samples_eps or (0.3 if small else 0.1)
  step = settings.adv_samples_step_size or (0.0075 if small else 0.0025)
  return eps, step


def table2_examples(settings):
  """Uniform draws for Table 2: as set, else the paper's 10,000 capped by max_examples."""
  if settings.table2_examples is not None:
    return settings.table2_examples
  return min(TABLE2_DEFAULT_EXAMPLES, settings.max_examples or TABLE2_DEFAULT_EXAMPLES)


def resolve_sets(settings, dataset):
  """Which sets to evaluate.

  Returns:
    (out-set keys, generated set names, whether to run Table 2, {key: reason} of default sets left
    out on purpose (ImageNet- without --imagenet_minus_dir)).
  """
  requested = settings.sets or (DATASETS,) + GENERATED_SETS + (TABLE2,)
  keys, left_out = [], {}
  for name in requested:
    if name == DATASETS:
      if not out_datasets.default_out_sets(dataset):
        left_out[DATASETS] = (
          f'{dataset} is your own data, which has no default out-distribution datasets: name '
          f'them with --sets (one of {", ".join(out_datasets.OUT_SETS)}), e.g. '
          '--sets=imagenet_minus --imagenet_minus_dir=<a folder of images unlike yours>.'
        )
      for key in out_datasets.default_out_sets(dataset):
        if key == 'imagenet_minus' and not settings.imagenet_minus_dir:
          left_out[key] = 'not public: pass --imagenet_minus_dir=<folder of images> to include it.'
        elif key not in keys:
          keys.append(key)
    elif (name in out_datasets.OUT_SETS or name in dict(settings.image_dirs)) and name not in keys:
      keys.append(name)
  generated = tuple(s for s in GENERATED_SETS if s in requested)
  return tuple(keys), generated, TABLE2 in requested, left_out


def settings_from_training_config(config, **overrides):
  """Settings of a training run's own evaluation (the trainer's periodic one, the export's).

  Args:
    config: a training config (configs/common.py): reads seed and eval.max_examples, batch_size,
      adv_noise_steps, adv_noise_eps, adv_noise_step_size and adv_noise_examples.
    **overrides: Settings fields that win (the export's num_examples and adv_noise_examples).

  Returns:
    Settings of the test set, noise and adversarial noise (one restart), nothing else.
  """
  e = config.eval
  fields = dict(
    sets=('noise', 'adv_noise'),
    max_examples=e.max_examples,
    batch_size=e.batch_size,
    adv_noise_steps=e.adv_noise_steps,
    adv_noise_eps=e.adv_noise_eps,
    adv_noise_step_size=e.adv_noise_step_size,
    adv_noise_examples=e.adv_noise_examples,
    seed=int(config.seed),
  )
  fields.update(overrides)
  return Settings(**fields)


def requested_sets(settings, skipped):
  """The names of settings.sets (default: GENERATED_SETS and TABLE2) not in `skipped`."""
  return tuple(s for s in settings.sets or GENERATED_SETS + (TABLE2,) if s not in skipped)
