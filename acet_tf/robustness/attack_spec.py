"""What an attack is, as data: its kind and budget (no TensorFlow, so settings and configs can
name attacks without loading their implementations, which are worst_case.py, pgd.py, apgd.py)."""

import dataclasses

KINDS = ('pgd', 'apgd')


@dataclasses.dataclass(frozen=True)
class Attack:
  """One attack with its budget.

  name: key in results.json ('pgd_paper', 'apgd', ...).
  kind: 'pgd' (pgd.pgd, the paper's attack: sign steps of step_fraction * eps) or 'apgd'
    (apgd.apgd).
  steps: iterations per restart; restarts: independent random starts, the best kept per point.
  step_fraction: PGD's step as a fraction of eps (the paper's 0.0075 at eps 0.3 is 0.025), so one
    attack serves every radius; unused by APGD, whose schedule starts at 2 eps.
  random_start: restart 0 starts inside the ball at random (False: at the centre; restarts >= 1
    always start at random).
  schedule: PGD only: ((steps, step_fraction), ...) segments run one after the other, each from
    the best point of the one before (a decaying step: ((60, 0.1), (80, 0.025), (60, 1 / 150))
    at eps 0.3 is 0.03, 0.0075, 0.002); steps must be their sum, step_fraction is unused.
  targets: APGD only: 0 (untargeted, the max log-confidence), or T > 0: APGD-T, as in AutoAttack,
    one run per target class, the T most likely classes at the ball's centre, each maximising that
    class's log-probability; the point's result is the best of the T by the max log-confidence.
    Other members climb the class on top at the start; APGD-T finds balls where another class
    reaches a higher confidence.
  """

  name: str
  kind: str
  steps: int
  restarts: int = 1
  step_fraction: float | None = None
  random_start: bool = True
  schedule: tuple = ()
  targets: int = 0

  def __post_init__(self):
    if self.schedule:
      segments = tuple((int(n), float(f)) for n, f in self.schedule)
      object.__setattr__(self, 'schedule', segments)
      if self.kind != 'pgd' or sum(n for n, _ in segments) != self.steps:
        raise ValueError(
          f'Attack {self.name!r}: a schedule is for PGD and its steps must sum to steps '
          f'({self.steps}), got {self.kind} {segments}'
        )
      if any(n < 1 or f <= 0 for n, f in segments):
        raise ValueError(f'Attack {self.name!r}: schedule segments need steps >= 1, fraction > 0')
      object.__setattr__(self, 'step_fraction', self.step_fraction or segments[0][1])
    if self.kind not in KINDS:
      raise ValueError(f'Attack {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}')
    if self.steps < 0 or self.restarts < 1:
      raise ValueError(
        f'Attack {self.name!r}: steps must be >= 0 and restarts >= 1, got '
        f'{self.steps} and {self.restarts}'
      )
    if self.targets < 0 or (self.targets and self.kind != 'apgd'):
      raise ValueError(
        f'Attack {self.name!r}: targets is for APGD and must be >= 0, got {self.kind} '
        f'targets={self.targets}'
      )
    if self.kind == 'pgd' and not (self.step_fraction and self.step_fraction > 0):
      raise ValueError(
        f'Attack {self.name!r}: PGD needs step_fraction > 0, got {self.step_fraction}'
      )

  @property
  def passes(self):
    """Forward (+ input-gradient) passes per point."""
    if self.schedule:
      return self.restarts * (self.steps + 2 * len(self.schedule))
    per_run = self.steps + (2 if self.kind == 'pgd' else 1)
    # APGD-T: one forward at the centre to rank the classes, then a run per target.
    return self.restarts * (max(self.targets, 1) * per_run + (1 if self.targets else 0))
