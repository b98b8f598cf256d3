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
  """

  name: str
  kind: str
  steps: int
  restarts: int = 1
  step_fraction: float | None = None
  random_start: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Attack {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}')
    if self.steps < 0 or self.restarts < 1:
      raise ValueError(
        f'Attack {self.name!r}: steps must be >= 0 and restarts >= 1, got '
        f'{self.steps} and {self.restarts}'
      )
    if self.kind == 'pgd' and not (self.step_fraction and self.step_fraction > 0):
      raise ValueError(
        f'Attack {self.name!r}: PGD needs step_fraction > 0, got {self.step_fraction}'
      )

  @property
  def passes(self):
    """Forward (+ input-gradient) passes per point."""
    return self.restarts * (self.steps + (2 if self.kind == 'pgd' else 1))
