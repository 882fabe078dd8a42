"""Batch planning (faithful / throughput policies) and the Plan's JSON round trip."""

from __future__ import annotations

import pytest

from launcher.hardware import HostFacts
from launcher.plan import Plan, plan_batch
from launcher.thresholds import Thresholds, plan_loader


@pytest.mark.parametrize("largest,world,micro,acc,eff", [(64, 1, 16, 1, 16), (5, 1, 5, 4, 20), (4, 1, 4, 4, 16),
                                                         (6, 2, 6, 2, 24), (1, 1, 1, 16, 16), (64, 4, 4, 1, 16)])
def test_faithful_keeps_the_effective_batch(largest: int, world: int, micro: int, acc: int, eff: int) -> None:
    b = plan_batch(largest, world, "faithful", 16, "linear", 5e-5, 1e-4)
    assert (b.micro_batch, b.accumulation, b.effective_batch) == (micro, acc, eff)
    if eff == 16:
        assert (b.lr_ve, b.lr_ed) == (5e-5, 1e-4) and b.reasons["lr"].startswith("unchanged")
    else:
        assert b.lr_ed == pytest.approx(1e-4 * eff / 16)


def test_throughput_grows_the_batch_and_scales_lr() -> None:
    b = plan_batch(64, 2, "throughput", 16, "sqrt", 5e-5, 1e-4)
    assert (b.micro_batch, b.accumulation, b.effective_batch) == (64, 1, 128)
    assert b.lr_ed == pytest.approx(1e-4 * (128 / 16) ** 0.5) and "sqrt" in b.reasons["lr"]
    none = plan_batch(64, 1, "throughput", 16, "none", 5e-5, 1e-4)
    assert none.lr_ed == 1e-4


def test_bad_policy_and_nothing_fits() -> None:
    with pytest.raises(ValueError, match="--batch-policy"):
        plan_batch(8, 1, "greedy", 16, "linear", 1e-4, 1e-4)
    with pytest.raises(ValueError, match="no micro-batch"):
        plan_batch(0, 1, "faithful", 16, "linear", 1e-4, 1e-4)


def test_plan_round_trips_through_json_and_has_a_reason_per_row() -> None:
    host = HostFacts(64, 40, 0, 0, 16)
    plan = Plan("plain", "cuda", "bf16", plan_batch(48, 1, "throughput", 16, "linear", 5e-5, 1e-4),
                plan_loader(host, Thresholds(), 1.0), 68.0, 61.2,
                {"backend": "plain: one GPU", "device": "cuda: 1 GPU visible", "precision": "bf16: supported"})
    assert Plan.from_json(plan.to_json()) == plan
    assert all(reason for _, _, reason in plan.rows())
