"""The clock of the bench scripts: device synchronization, peak GPU memory, training steps timed
through a data loader, and milliseconds per call of a function.

A GPU runs ahead of Python, so every clock here starts and stops on a synchronized device; what
comes before the clock (warm-up: kernels, the allocator, cuDNN's autotuning, CUDA graph capture)
is run and waited for, never timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since the last reset_peak; None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def ms_per_call(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Milliseconds per call of fn over `reps` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - start) / reps


@dataclass(frozen=True)
class StepTiming:
    """The timed steps of time_training."""

    steps: int
    samples: int
    elapsed_s: float
    data_wait_s: float  # the loop waiting for the loader's next batch
    peak_allocated_gib: float | None  # over warm-up and timed steps; None on a CPU

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed_s

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.elapsed_s / self.steps

    @property
    def data_wait_pct(self) -> float:
        return 100 * self.data_wait_s / self.elapsed_s


def time_training(loader: Iterable[dict], step: Callable[[dict], object], device: torch.device, warmup: int,
                  steps: int, first_batch: Callable[[dict], object] | None = None) -> StepTiming:
    """`warmup` steps, then `steps` timed ones, `step(batch)` on the loader's batches, epoch after epoch.

    The clock starts on a synchronized device when the warm-up is done and stops on one after the last
    step; samples are the studies (`batch["ids"]`) of the timed steps; data wait is the time from the
    end of one step (or from asking a new epoch's iterator) to the next batch in hand. `first_batch`, if
    given, sees the first batch before its step, outside the clock (train_throughput counts FLOPs on it).
    Peak memory is reset when called, so it covers the warm-up too.
    """
    reset_peak(device)
    done, samples, wait, start = 0, 0, 0.0, 0.0
    while done < warmup + steps:
        fetched = time.perf_counter()
        for batch in loader:
            if first_batch is not None and done == 0:
                first_batch(batch)
            if done == warmup:
                sync(device)
                start, samples, wait, fetched = time.perf_counter(), 0, 0.0, time.perf_counter()
            wait += time.perf_counter() - fetched
            step(batch)
            samples += len(batch["ids"])
            done += 1
            if done == warmup + steps:
                break
            fetched = time.perf_counter()
    sync(device)
    elapsed = time.perf_counter() - start
    return StepTiming(steps, samples, elapsed, wait, peak_allocated_gib(device))
