"""Probe maths, pure: fit peak memory against micro-batch size, predict the largest micro-batch
under a budget, and confirm it by a binary search over real (or, in tests, fake) steps.

Training memory is close to affine in the micro-batch: weights, gradients and optimizer state are
fixed, activations grow per sample. The fit is least squares over the probed points; the search
then trusts only real steps, so a poor fit costs probe time, never an out-of-memory run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any



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


PROBE_POINTS = (4, 8, 16)
"""Micro-batch sizes measured for the fit: large enough that activations dominate allocator rounding,
small enough to fit an 8 GB card in fp32 with the full model."""

CAP_FIRST_MAX = 128
"""A cap up to this many studies is tried right after the warm-up (the published batch of 16; auto's
cap for steps per epoch, 65 on the embedded set's 2100 train studies): when it fits, that one step is
the answer (on an H200 the points 4, 8 and 16 cost ~20 s of new cuDNN shapes). A larger cap (the whole
train split, under --batch-policy throughput) would mostly be one wasted out-of-memory step."""


@dataclass(frozen=True)
class ProbeSearch:
    points: tuple[tuple[int, float], ...]   # (micro-batch, peak GiB) of the fitted steps
    fit: MemoryFit | None                   # None when fewer than two sizes fitted
    predicted: int                          # the fit's largest micro-batch under the budget (capped)
    micro_batch: int                        # confirmed by a real step; 0 when nothing fits
    tried: tuple[tuple[int, StepResult], ...]


def search_micro_batch(step: Callable[[int], StepResult], budget_gib: float, max_micro: int,
                       points: Sequence[int] = PROBE_POINTS, smallest: int = 1,
                       measure: Callable[[int], StepResult] | None = None) -> ProbeSearch:
    """Measure a few sizes, fit, predict the largest micro-batch under the budget, confirm it.

    `step(b)` runs one real training step at micro-batch b and reports its peak; the first call (at
    `smallest`, see r2gen.model.visual_extractor.smallest_micro_batch) also warms up (optimizer
    state, kernels). Sizes above `max_micro` are never tried. A cap within the fit's sizes (the
    published batch of 16, say) or up to CAP_FIRST_MAX is tried first, right after the warm-up: when
    it fits, that one step is the answer. `measure(b)` (default: `step`) runs the steps whose size is
    not a candidate answer, the warm-up and the fit's points (on a GPU: without cuDNN's costly
    autotuning of a shape training will not use); every candidate runs as `step`.
    """
    tried: list[tuple[int, StepResult]] = []

    def run(b: int, candidate: bool = True) -> StepResult:
        result = step(b) if candidate or measure is None else measure(b)
        tried.append((b, result))
        return result

    if not run(smallest, candidate=False).fits:
        return ProbeSearch((), None, 0, 0, tuple(tried))
    known_bad = None
    if smallest < max_micro <= max(CAP_FIRST_MAX, *points):
        capped = run(max_micro)
        if capped.fits:
            point = (max_micro, capped.peak_gib)
            return ProbeSearch((point,), None, max_micro, max_micro, tuple(tried))  # type: ignore[arg-type]
        known_bad = max_micro
    sizes = {min(p, max_micro) for p in points}
    measured: list[tuple[int, float]] = []
    for b in sorted(b for b in sizes if b > smallest and (known_bad is None or b < known_bad)):
        result = run(b, candidate=False)  # below the cap (a cap within the points was tried first)
        if not result.fits:
            known_bad = b
            break
        measured.append((b, result.peak_gib))  # type: ignore[arg-type]
    known_good = max((b for b, _ in measured), default=smallest)
    fit = fit_memory(measured) if len({b for b, _ in measured}) >= 2 else None
    if fit is not None:
        predicted = min(fit.max_batch(budget_gib), max_micro)
    else:  # one size fitted: bisect between it and the first failure (or the cap)
        predicted = known_bad - 1 if known_bad else max_micro
    if known_bad is None and known_good >= max_micro:
        return ProbeSearch(tuple(measured), fit, max_micro, max_micro, tuple(tried))
    search = confirm_largest(run, predicted, known_good=known_good, known_bad=known_bad)
    return ProbeSearch(tuple(measured), fit, predicted, max(search.micro_batch, known_good), tuple(tried))


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


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured (launcher.probe), kept typed in the Plan."""

    gpu: str
    budget_gib: float
    overhead_gib: float           # outside torch's allocator; the allocator gets budget - overhead
    points: tuple[tuple[int, float], ...]
    fixed_gib: float | None
    per_sample_gib: float | None
    predicted: int
    micro_batch: int              # confirmed by a real step; 0: not even one study fits
    peak_gib: float | None        # peak reserved at micro_batch, plus overhead
    tried: tuple[tuple[int, bool, float | None], ...]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeResult":
        """A probe as plan.json holds it (JSON lists back to the tuples it was measured in)."""
        return cls(**{**data, "points": tuple(tuple(p) for p in data["points"]),
                      "tried": tuple(tuple(t) for t in data["tried"])})
