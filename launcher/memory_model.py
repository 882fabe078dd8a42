"""Probe maths, pure: fit peak memory against micro-batch size, predict the largest micro-batch
under a budget, and confirm it by a binary search over real (or, in tests, fake) steps.

Training memory is close to affine in the micro-batch: weights, gradients and optimizer state are
fixed, activations grow per sample. The fit is least squares over the probed points; the search
then trusts only real steps, so a poor fit costs probe time, never an out-of-memory run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryFit:
    fixed_gib: float          # memory at micro-batch 0: weights, grads, optimizer state, workspace
    per_sample_gib: float     # activation memory per study

    def predict_gib(self, micro_batch: int) -> float:
        return self.fixed_gib + self.per_sample_gib * micro_batch

    def max_batch(self, budget_gib: float) -> int:
        """Largest micro-batch whose predicted peak fits the budget (0 if even the fixed part does not)."""
        if budget_gib < self.fixed_gib + self.per_sample_gib:
            return 0
        return int(math.floor((budget_gib - self.fixed_gib) / self.per_sample_gib + 1e-9))


def fit_memory(points: Sequence[tuple[int, float]]) -> MemoryFit:
    """Least-squares line through (micro_batch, peak_gib); needs two distinct batch sizes."""
    if len({b for b, _ in points}) < 2:
        raise ValueError("fit_memory needs peaks at two or more distinct micro-batch sizes")
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / var
    # Allocator rounding can make two small batches look equal; a sample never costs nothing.
    slope = max(slope, 1e-6)
    return MemoryFit(fixed_gib=mean_m - slope * mean_b, per_sample_gib=slope)


def memory_budget_gib(total_gib: float, used_by_others_gib: float, target_util_pct: float,
                      max_vram_gib: float | None = None) -> float:
    """The memory a run may plan to use: target share of the card, capped, minus what others hold."""
    budget = total_gib * target_util_pct / 100.0
    if max_vram_gib is not None:
        budget = min(budget, max_vram_gib)
    return max(budget - used_by_others_gib, 0.0)


@dataclass(frozen=True)
class StepResult:
    fits: bool                # ran without OOM and stayed within the budget
    peak_gib: float | None    # None when the step ran out of memory


@dataclass(frozen=True)
class SearchResult:
    micro_batch: int          # 0 when not even a micro-batch of 1 fits
    tried: tuple[tuple[int, StepResult], ...]


def confirm_largest(step: Callable[[int], StepResult], predicted: int, known_good: int = 0,
                    known_bad: int | None = None) -> SearchResult:
    """Confirm the predicted micro-batch with a real step; on failure binary-search downwards.

    `known_good` fitted already (0: nothing known); `known_bad` is a size known to fail. Every
    size tried is returned, in order, so callers can report the probe's work.
    """
    tried: list[tuple[int, StepResult]] = []

    def fits(micro_batch: int) -> bool:
        result = step(micro_batch)
        tried.append((micro_batch, result))
        return result.fits

    lo, hi = known_good, known_bad  # invariant: lo fits (or is 0), hi fails (or is unknown)
    candidate = max(predicted, 1)
    if hi is not None:
        candidate = min(candidate, hi - 1)
    if candidate <= lo:
        return SearchResult(lo, ())
    if fits(candidate):
        return SearchResult(candidate, tuple(tried))
    hi = candidate
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, tuple(tried))


def accumulation_steps(effective_batch: int, micro_batch: int, world_size: int = 1) -> int:
    """Micro-batches per optimizer step so that micro x world x accumulation >= effective batch."""
    if min(effective_batch, micro_batch, world_size) < 1:
        raise ValueError("effective batch, micro-batch and world size must be positive")
    return math.ceil(effective_batch / (micro_batch * world_size))


LR_SCALING = ("linear", "sqrt", "none")


def scale_lr(lr: float, base_batch: int, new_batch: int, rule: str) -> float:
    """Learning rate for new_batch given one tuned at base_batch (Goyal et al.: linear; sqrt for Adam)."""
    if rule not in LR_SCALING:
        raise ValueError(f"unknown lr scaling {rule!r}; choose one of {', '.join(LR_SCALING)}")
    ratio = new_batch / base_batch
    return lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
