"""Figures over seeds: each one as its mean, standard deviation and runs, and comparisons that say
whether a difference is inside the seed-to-seed spread rather than printing a bare difference.

R2Gen's quality moves with the seed about as much as the effects people look for (a 5-seed mean
BLEU-4 of 0.118 against the paper's single 0.165), so a speed-up or a precision "keeps quality" only
where its difference to the reference is within that spread. The rule (`within_spread`): two
figures agree when their means differ by at most twice the standard error of that difference,
sqrt(s_a^2/n_a + s_b^2/n_b) (Welch's, ~95% for normal seed noise); with one run on either side no
spread is measured and nothing is claimed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from r2gen.errors import ConfigError

SPREAD_RULE = ("within the spread: the means differ by at most twice the standard error of their difference "
               "(sqrt(s_a^2/n_a + s_b^2/n_b), the seeds' sample standard deviations)")


@dataclass(frozen=True)
class Spread:
    """One figure over seeds: the runs in seed order."""

    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        """The spread of the values that exist (None: a run that did not reach or log it); None if none."""
        runs = tuple(float(v) for v in values if v is not None)
        return cls(runs) if runs else None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs)

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1); None for one run."""
        return statistics.stdev(self.runs) if self.n >= 2 else None

    def text(self, digits: int = 3) -> str:
        """`0.930 ± 0.020 (0.910, 0.930, 0.950)`; one run: `0.930 (one run)`."""
        if self.std is None:
            return f"{self.mean:.{digits}f} (one run)"
        runs = ", ".join(f"{v:.{digits}f}" for v in self.runs)
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} ({runs})"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "runs": list(self.runs)}

    @classmethod
    def from_dict(cls, stored: dict) -> Spread:
        """The spread a to_dict() (summary.json, a bench's JSON) holds."""
        return cls(tuple(stored["runs"]))


def stored(values: Iterable[float | None]) -> dict | None:
    """Spread.of(values) as summary.json and the benches keep it (to_dict), None where no run has a value."""
    found = Spread.of(values)
    return found.to_dict() if found else None


def shown(stored_spread: dict | None, digits: int = 3) -> str:
    """A stored spread as text (Spread.text), "n/a" where there is none."""
    return Spread.from_dict(stored_spread).text(digits) if stored_spread else "n/a"


def seed_run_name(name: str, seed: int | None) -> str:
    """The run folder of one seed: `<name>-s<seed>` (the study's, --seeds', time_to_quality's); `name`
    alone where no seed is named."""
    return name if seed is None else f"{name}-s{seed}"


def seed_list(first: int, count: int) -> list[int]:
    """The seeds of `--seeds count`: first, first + 1, ...; ConfigError below one."""
    if count < 1:
        raise ConfigError(f"--seeds: at least 1, got {count}")
    return [first + i for i in range(count)]


def within_spread(a: Spread, b: Spread) -> bool | None:
    """Whether a and b agree within their seeds' spread (SPREAD_RULE); None where either is one run."""
    if a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) <= 2 * math.sqrt(a.std**2 / a.n + b.std**2 / b.n)


def verdict(a: Spread | None, b: Spread | None) -> str:
    """What a comparison of a with b may say."""
    if a is None or b is None:
        return "not measured on both sides"
    agree = within_spread(a, b)
    if agree is None:
        return "one run on a side: no spread measured"
    return "within the spread" if agree else "outside the spread"
