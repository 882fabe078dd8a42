"""The Plan: every decision the launcher makes for a run, with the reason a user reads.

Pure: built from hardware facts, thresholds and probe results (plain values), serialized to
plan.json in the run directory, and read back by --keep-training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from launcher.memory_model import accumulation_steps, scale_lr
from launcher.thresholds import LoaderPlan

BATCH_POLICIES = ("faithful", "throughput")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int          # studies per forward/backward on one process
    accumulation: int         # micro-batches per optimizer step
    world_size: int
    effective_batch: int      # studies per optimizer step, all processes together
    lr_ve: float
    lr_ed: float
    reasons: dict[str, str]


def plan_batch(largest_micro: int, world_size: int, policy: str, effective_batch: int, lr_scaling: str,
               lr_ve: float, lr_ed: float) -> BatchPlan:
    """Micro-batch, accumulation and learning rates from the largest micro-batch that fits.

    faithful: keep `effective_batch` (R2Gen's 16) exactly or, when it is not a multiple of
    micro x world, as the nearest larger one; learning rates unchanged. throughput: one micro-batch
    per step at the largest size, learning rates scaled from `effective_batch` by `lr_scaling`.
    """
    if policy not in BATCH_POLICIES:
        raise ValueError(f"--batch-policy: unknown {policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
    if largest_micro < 1:
        raise ValueError("no micro-batch fits in memory")
    reasons: dict[str, str] = {}
    if policy == "faithful":
        # No use in a micro-batch larger than one process's share of the effective batch.
        share = -(-effective_batch // world_size)
        micro = min(largest_micro, share)
        accumulation = accumulation_steps(effective_batch, micro, world_size)
        effective = micro * world_size * accumulation
        reasons["micro_batch"] = (f"{micro}: largest that fits is {largest_micro}, one process's share of the "
                                  f"effective batch {effective_batch} is {share}")
        reasons["accumulation"] = (f"{accumulation}: ceil({effective_batch} / ({micro} x {world_size} process(es)))")
        reasons["effective_batch"] = (f"{effective}: faithful to {effective_batch}" if effective == effective_batch
                                      else f"{effective}: nearest multiple of {micro} x {world_size} above {effective_batch}")
        new_ve, new_ed = lr_ve, lr_ed
        reasons["lr"] = "unchanged: the effective batch is kept"
        if effective != effective_batch:
            new_ve = scale_lr(lr_ve, effective_batch, effective, lr_scaling)
            new_ed = scale_lr(lr_ed, effective_batch, effective, lr_scaling)
            reasons["lr"] = f"scaled {lr_scaling} by {effective}/{effective_batch}"
        return BatchPlan(micro, accumulation, world_size, effective, new_ve, new_ed, reasons)

    micro, accumulation = largest_micro, 1
    effective = micro * world_size
    reasons["micro_batch"] = f"{micro}: the largest that fits the memory budget"
    reasons["accumulation"] = "1: throughput policy steps after every micro-batch"
    reasons["effective_batch"] = f"{effective}: {micro} x {world_size} process(es) (preset: {effective_batch})"
    new_ve = scale_lr(lr_ve, effective_batch, effective, lr_scaling)
    new_ed = scale_lr(lr_ed, effective_batch, effective, lr_scaling)
    reasons["lr"] = (f"scaled {lr_scaling} by {effective}/{effective_batch}: visual extractor {lr_ve:g} -> "
                     f"{new_ve:.3g}, encoder-decoder {lr_ed:g} -> {new_ed:.3g}")
    return BatchPlan(micro, accumulation, world_size, effective, new_ve, new_ed, reasons)


@dataclass(frozen=True)
class Plan:
    backend: str
    device: str
    precision: str
    batch: BatchPlan
    loader: LoaderPlan
    memory_budget_gib: float | None   # None on CPU
    predicted_peak_gib: float | None
    reasons: dict[str, str]           # backend, precision, device

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        return cls(**{**data, "batch": BatchPlan(**data["batch"]), "loader": LoaderPlan(**data["loader"])})

    def rows(self) -> list[tuple[str, str, str]]:
        """(decision, value, reason) rows for the console table."""
        rows = [(k, str(getattr(self, k)), self.reasons.get(k, "")) for k in ("backend", "device", "precision")]
        b, lo = self.batch, self.loader
        rows += [("micro_batch", str(b.micro_batch), b.reasons["micro_batch"]),
                 ("accumulation", str(b.accumulation), b.reasons["accumulation"]),
                 ("effective_batch", str(b.effective_batch), b.reasons["effective_batch"]),
                 ("lr (visual / rest)", f"{b.lr_ve:.3g} / {b.lr_ed:.3g}", b.reasons["lr"])]
        rows += [(k, str(getattr(lo, k)), lo.reasons.get(k, ""))
                 for k in ("num_workers", "pin_memory", "persistent_workers", "cache_images", "low_memory")]
        if self.memory_budget_gib is not None:
            rows.append(("memory budget GiB", f"{self.memory_budget_gib:.1f}",
                         f"predicted peak {self.predicted_peak_gib:.1f} GiB" if self.predicted_peak_gib else ""))
        return rows
