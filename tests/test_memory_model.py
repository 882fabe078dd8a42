"""Probe maths against a fake GPU whose memory use is known exactly."""

from __future__ import annotations

import math

import pytest

from launcher.memory_model import (StepResult, accumulation_steps, confirm_largest, fit_memory, memory_budget_gib,
                                   scale_lr, search_micro_batch)
from r2gen.model.visual_extractor import smallest_micro_batch


class FakeGpu:
    """Peak = fixed + per_sample x batch + a bump above `knee` the affine fit cannot see."""

    def __init__(self, fixed: float, per_sample: float, budget: float, knee: int | None = None, bump: float = 0.0):
        self.fixed, self.per_sample, self.budget, self.knee, self.bump = fixed, per_sample, budget, knee, bump
        self.calls: list[int] = []

    def peak(self, batch: int) -> float:
        extra = self.bump if self.knee is not None and batch > self.knee else 0.0
        return self.fixed + self.per_sample * batch + extra

    def step(self, batch: int) -> StepResult:
        self.calls.append(batch)
        peak = self.peak(batch)
        return StepResult(True, peak) if peak <= self.budget else StepResult(False, None)

    def truth(self) -> int:
        return max(b for b in range(0, 10_000) if b == 0 or self.peak(b) <= self.budget)


def test_fit_recovers_an_affine_model_exactly() -> None:
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=60)
    fit = fit_memory([(b, gpu.peak(b)) for b in (2, 4, 8)])
    assert fit.fixed_gib == pytest.approx(3.1) and fit.per_sample_gib == pytest.approx(0.27)
    assert fit.max_batch(60) == gpu.truth() == math.floor((60 - 3.1) / 0.27)


def test_fit_needs_two_sizes_and_never_has_zero_slope() -> None:
    with pytest.raises(ValueError):
        fit_memory([(4, 1.0), (4, 1.1)])
    fit = fit_memory([(1, 2.0), (2, 2.0)])
    assert fit.per_sample_gib > 0 and fit.max_batch(3.0) > 1000


def test_max_batch_is_zero_when_nothing_fits() -> None:
    fit = fit_memory([(1, 5.0), (2, 6.0)])
    assert fit.max_batch(4.5) == 0 and fit.max_batch(5.0) == 1


@pytest.mark.parametrize("total,others,pct,cap,expected", [
    (80, 0, 85, None, 68.0), (80, 10, 85, None, 58.0), (80, 0, 85, 8, 8.0), (8, 1, 85, 16, 5.8), (8, 9, 85, None, 0.0)])
def test_budget(total: float, others: float, pct: float, cap: float | None, expected: float) -> None:
    assert memory_budget_gib(total, others, pct, cap) == pytest.approx(expected)


def test_confirm_accepts_a_correct_prediction_with_one_step() -> None:
    gpu = FakeGpu(fixed=2, per_sample=0.5, budget=20)
    result = confirm_largest(gpu.step, predicted=36, known_good=8)
    assert result.micro_batch == 36 == gpu.truth() and gpu.calls == [36]


@pytest.mark.parametrize("bump", [0.5, 3.0, 15.0])
def test_confirm_steps_down_to_the_true_largest_when_the_fit_overshoots(bump: float) -> None:
    gpu = FakeGpu(fixed=2, per_sample=0.5, budget=20, knee=16, bump=bump)
    fit = fit_memory([(b, gpu.peak(b)) for b in (2, 4, 8)])  # blind to the bump above 16
    result = confirm_largest(gpu.step, fit.max_batch(20), known_good=8)
    assert result.micro_batch == gpu.truth()
    assert all(not r.fits for b, r in result.tried if b > result.micro_batch)
    assert len(gpu.calls) <= 1 + math.ceil(math.log2(36))


def test_confirm_respects_a_known_failure_and_can_find_nothing() -> None:
    gpu = FakeGpu(fixed=2, per_sample=0.5, budget=20)
    assert confirm_largest(gpu.step, predicted=100, known_good=0, known_bad=30).micro_batch == 29
    tiny = FakeGpu(fixed=5, per_sample=1, budget=4)
    result = confirm_largest(tiny.step, predicted=3)
    assert result.micro_batch == 0 and [b for b, _ in result.tried] == [3, 1]


def test_confirm_returns_known_good_without_steps_when_prediction_is_lower() -> None:
    gpu = FakeGpu(fixed=2, per_sample=0.5, budget=20)
    assert confirm_largest(gpu.step, predicted=4, known_good=8) .micro_batch == 8 and gpu.calls == []


@pytest.mark.parametrize("effective,micro,world,expected", [(16, 16, 1, 1), (16, 5, 1, 4), (16, 4, 2, 2),
                                                            (16, 64, 1, 1), (17, 8, 1, 3), (1, 1, 8, 1)])
def test_accumulation(effective: int, micro: int, world: int, expected: int) -> None:
    assert accumulation_steps(effective, micro, world) == expected
    assert micro * world * expected >= effective


def test_accumulation_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        accumulation_steps(16, 0)


def test_lr_scaling() -> None:
    assert scale_lr(1e-4, 16, 64, "linear") == pytest.approx(4e-4)
    assert scale_lr(1e-4, 16, 64, "sqrt") == pytest.approx(2e-4)
    assert scale_lr(1e-4, 16, 64, "none") == 1e-4
    with pytest.raises(ValueError, match="lr scaling"):
        scale_lr(1e-4, 16, 64, "cubic")


@pytest.mark.parametrize("gpu,max_micro", [
    (FakeGpu(fixed=3.1, per_sample=0.27, budget=68), 10_000),            # affine: the fit is exact
    (FakeGpu(fixed=3.1, per_sample=0.27, budget=68, knee=100, bump=4), 10_000),  # the fit overshoots
    (FakeGpu(fixed=5.0, per_sample=0.2, budget=6.2), 10_000),            # 8 does not fit: one point
    (FakeGpu(fixed=1.0, per_sample=0.5, budget=2.4), 10_000),            # only 1 and 2 fit
    (FakeGpu(fixed=3.1, per_sample=0.27, budget=68), 50),                # capped by the data set
    (FakeGpu(fixed=3.1, per_sample=0.27, budget=68), 6),                 # cap below the probe points
])
def test_search_finds_the_true_largest_within_the_cap(gpu: FakeGpu, max_micro: int) -> None:
    result = search_micro_batch(gpu.step, gpu.budget, max_micro)
    assert result.micro_batch == min(gpu.truth(), max_micro)
    assert max(gpu.calls) <= max_micro and gpu.calls[0] == 1
    assert gpu.peak(result.micro_batch) <= gpu.budget


def test_search_never_steps_below_the_smallest_trainable_micro_batch() -> None:
    """32 px images leave ResNet a 1x1 last feature map, where BatchNorm cannot train on one sample
    (seen on a GPU: the probe's first step at 1 failed for the tiny preset)."""
    assert smallest_micro_batch(32) == 2 and smallest_micro_batch(33) == 1 and smallest_micro_batch(224) == 1
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=68)
    result = search_micro_batch(gpu.step, 68, 10_000, smallest=2)
    assert gpu.calls[:4] == [2, 4, 8, 16] and min(gpu.calls) == 2 and result.micro_batch == gpu.truth()
    tight = FakeGpu(fixed=1.0, per_sample=0.5, budget=2.4)  # only 1 and 2 fit
    assert search_micro_batch(tight.step, tight.budget, 10_000, smallest=2).micro_batch == 2
    assert min(tight.calls) == 2


def test_a_cap_within_the_probe_sizes_is_tried_first() -> None:
    """The published batch of 16 caps the micro-batch: the warm-up and the cap answer (the probe took
    4 steps, about 38 s, per study run on an H200 before)."""
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=68)
    result = search_micro_batch(gpu.step, 68, 16)
    assert gpu.calls == [1, 16] and result.micro_batch == 16
    small = FakeGpu(fixed=3.1, per_sample=0.27, budget=6.0)  # 16 does not fit: the search goes on below it
    result = search_micro_batch(small.step, small.budget, 16)
    assert small.calls[:2] == [1, 16] and max(small.calls[2:]) < 16
    assert result.micro_batch == small.truth() < 16


def test_autos_cap_for_steps_per_epoch_is_tried_first_too() -> None:
    """65 studies (2100 train studies / 32 steps per epoch): warm-up and cap, two steps instead of five."""
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=68)
    assert search_micro_batch(gpu.step, 68, 65).micro_batch == 65 and gpu.calls == [1, 65]
    small = FakeGpu(fixed=3.1, per_sample=0.27, budget=12.0)  # 65 does not fit: the fit below it decides
    assert search_micro_batch(small.step, small.budget, 65).micro_batch == small.truth() < 65
    assert small.calls[:2] == [1, 65] and max(small.calls[2:]) < 65
    whole = FakeGpu(fixed=3.1, per_sample=0.27, budget=68)  # the train split (throughput): not tried first
    search_micro_batch(whole.step, 68, 2100)
    assert whole.calls[:4] == [1, 4, 8, 16]


def test_search_costs_few_steps_when_the_fit_is_right() -> None:
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=68)
    result = search_micro_batch(gpu.step, 68, 10_000)
    assert gpu.calls == [1, 4, 8, 16, gpu.truth()] and result.predicted == gpu.truth()
    assert result.fit is not None and result.fit.per_sample_gib == pytest.approx(0.27)


def test_search_reports_nothing_fits() -> None:
    gpu = FakeGpu(fixed=7.0, per_sample=1.0, budget=6.0)
    result = search_micro_batch(gpu.step, 6.0, 100)
    assert result.micro_batch == 0 and gpu.calls == [1]


@pytest.mark.parametrize("max_micro, points, measured, stepped", [
    (10_000, (4, 8, 16), [1, 4, 8, 16], None),  # the fit's points measured; the prediction (the answer) stepped
    (65, (4, 8, 16), [1], [65]),                 # auto's cap right after the warm-up: the answer
    (16, (4, 8, 16), [1], [16]),                 # the published batch as the cap: the answer
    (12, (4, 8, 16), [1, 4, 8], [12, 11]),       # 12 does not fit: the points below it measured, 11 stepped
])
def test_only_candidate_answers_take_the_training_path(max_micro: int, points: tuple[int, ...], measured: list[int],
                                                        stepped: list[int] | None) -> None:
    """The warm-up and the fit's points go to `measure` (on a GPU: no cuDNN autotuning of a shape that
    training will not use, ~8 s each on an H200); every size that may be the answer goes to `step`."""
    gpu = FakeGpu(fixed=3.1, per_sample=0.27, budget=68 if max_micro != 12 else 6.1)
    steps: list[int] = []

    def step(b: int) -> StepResult:
        steps.append(b)
        return gpu.step(b)

    result = search_micro_batch(step, gpu.budget, max_micro, points, measure=gpu.step)
    assert [b for b in gpu.calls if b not in steps] == measured
    assert steps == (stepped if stepped is not None else [gpu.truth()]) and result.micro_batch == steps[-1]
