"""launcher.spread: figures over seeds and the within-the-spread rule, from their definitions."""

from __future__ import annotations

import math

import pytest

from launcher.spread import Spread, verdict, within_spread


def test_a_spread_is_its_runs_mean_and_sample_deviation() -> None:
    s = Spread.of([0.91, None, 0.93, 0.95])  # a run that never logged the figure is left out
    assert s.runs == (0.91, 0.93, 0.95) and s.n == 3
    assert s.mean == pytest.approx(0.93, abs=2**-50)
    assert s.std == pytest.approx(0.02, rel=2**-48)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert s.text() == "0.930 ± 0.020 (0.910, 0.930, 0.950)"
    one = Spread.of([0.5])
    assert one.std is None and one.text(2) == "0.50 (one run)"
    assert Spread.of([None, None]) is None


def test_within_the_spread_is_two_standard_errors_of_the_difference() -> None:
    a = Spread((1.0, 2.0, 3.0))  # mean 2, s 1
    se = math.sqrt(1 / 3 + 1 / 3)
    just_inside, just_outside = Spread((1.0 + 2 * se - 1e-9, 2.0 + 2 * se - 1e-9, 3.0 + 2 * se - 1e-9)), \
        Spread((1.0 + 2 * se + 1e-9, 2.0 + 2 * se + 1e-9, 3.0 + 2 * se + 1e-9))
    assert within_spread(a, just_inside) is True and within_spread(a, just_outside) is False
    assert verdict(a, just_inside) == "within the spread" and verdict(just_outside, a) == "outside the spread"
    assert within_spread(a, Spread((2.0,))) is None and verdict(a, Spread((2.0,))).startswith("one run")
    assert verdict(a, None) == "not measured on both sides"
    identical = Spread((0.7, 0.7))  # no seed noise at all: only the same mean agrees
    assert within_spread(identical, Spread((0.7, 0.7))) and not within_spread(identical, Spread((0.71, 0.71)))


def test_the_stored_form_round_trips_and_seed_lists_start_at_the_first() -> None:
    from launcher.spread import seed_list, shown, stored
    from r2gen.errors import ConfigError

    kept = stored([0.91, None, 0.95])
    assert kept == Spread((0.91, 0.95)).to_dict() and Spread.from_dict(kept) == Spread((0.91, 0.95))
    assert stored([None]) is None and shown(None) == "n/a" and shown(kept, 2) == Spread((0.91, 0.95)).text(2)
    assert seed_list(9223, 3) == [9223, 9224, 9225]
    with pytest.raises(ConfigError, match="--seeds: at least 1, got 0"):
        seed_list(9223, 0)
