"""One optimizer step of the loop: a window of studies in micro-batches, with recovery from out-of-memory.

`train_step` splits a loader batch (one accumulation window) into micro-batches (`split_batch`),
divides each micro-batch's loss by the window's token count and steps once; `OomRecovery` redoes a
window in half the micro-batch after an out-of-memory error; `warmed_up` scales the learning rates
during the linear warm-up; `cap_gpu_memory` is --max-vram and `release_memory` what an
out-of-memory error leaves to free.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from r2gen.data.datasets import images_to_device
from r2gen.data.order import chunk_sizes
from r2gen.engine import TrainingEngine
from r2gen.model.r2gen import masked_nll, target_tokens
from r2gen.model.visual_extractor import smallest_micro_batch
from r2gen.speedups import cudnn_autotuning, release_graphs
from r2gen.units import GIB

T = TypeVar("T")


def micro_batch_sizes(total: int, micro_batch: int, smallest: int = 1) -> list[int]:
    """`total` studies in micro-batches of `micro_batch`, the last one shorter. A last one under
    `smallest` (see smallest_micro_batch) takes studies from the one before (9 in 4s, smallest 2:
    4, 3, 2) or, with none to spare there, joins it (3 in 2s: 3). A micro_batch under `smallest` (an
    out-of-memory recovery halving it to 1) counts as `smallest`."""
    micro_batch = max(micro_batch, smallest)
    sizes = chunk_sizes(total, micro_batch)
    if len(sizes) > 1 and sizes[-1] < smallest:
        short = smallest - sizes[-1]
        sizes[-2:] = [sizes[-2] - short, smallest] if sizes[-2] - short >= smallest else [sizes[-2] + sizes[-1]]
    return sizes


def split_batch(batch: dict, micro_batch: int, smallest: int = 1) -> list[dict]:
    """Chunks of at most `micro_batch` studies, none under `smallest` where avoidable (see
    micro_batch_sizes), each trimmed to its own longest report.

    Trimming drops only trailing padding, which the causal decoder and the mask ignore, so a chunk
    computes what the same rows compute inside the whole batch.
    """
    chunks, start = [], 0
    for size in micro_batch_sizes(len(batch["ids"]), micro_batch, smallest):
        rows = slice(start, start + size)
        start += size
        masks = batch["masks"][rows]
        width = int(masks.sum(1).max().item())
        chunks.append({"ids": batch["ids"][rows], "images": batch["images"][rows],
                       "targets": batch["targets"][rows, :width], "masks": masks[:, :width]})
    return chunks


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: TrainingEngine, batch: dict,
               clip_value: float, micro_batch: int | None = None) -> tuple[float, bool]:
    """One teacher-forced optimizer step on a collated batch, in micro-batches of `micro_batch`.

    The batch is one accumulation window: each micro-batch's loss is divided by the window's token
    count, so gradients equal one step on the whole batch (R2Gen's per-token mean), also for the
    uneven last window of an epoch. Returns (per-token loss, whether the optimizer stepped).

    Every process agrees on the window before it is reduced and stepped (one all-reduce of two flags):
    - an out-of-memory error on any process (that process skips the rest of its window) drops the
      window's gradients on all of them and raises WindowOutOfMemory everywhere, for OomRecovery to
      redo it smaller on every process; with one process the error is raised as it comes;
    - a loss that is not finite on any process drops them too and raises NonFiniteLoss.
    Engines that reduce inside backward (DeepSpeed; not can_redo_step) agree before the last backward,
    on the loss alone: their out-of-memory errors stop the run (OomRecovery.step).
    """
    # In training mode BatchNorm needs more than one study behind a 1x1 feature map (32 px or less).
    smallest = smallest_micro_batch(batch["images"].shape[-1]) if model.training else 1
    micro = micro_batch or len(batch["ids"])
    chunks = split_batch(batch, micro, smallest)
    # The window's gradients are averaged over processes (TrainingEngine.step): divide by the mean token
    # count per process, so the update is the per-token mean over every process's window.
    tokens = backend.all_reduce_sum(target_tokens(batch["masks"]).to(backend.device)) / backend.world_size
    total = torch.zeros((), device=backend.device)
    agree_here = backend.world_size > 1 and backend.can_redo_step
    failed = ""
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        try:
            images = images_to_device(chunk["images"], backend.device)
            targets = chunk["targets"].to(backend.device, non_blocking=True)
            masks = chunk["masks"].to(backend.device, non_blocking=True)
            with backend.autocast(), cudnn_autotuning(len(chunk["ids"]) == micro):  # a shorter chunk: heuristics
                logprobs = model(images, targets)
            loss = masked_nll(logprobs.float(), targets, masks, tokens)
            total += loss.detach()
            if last and not backend.can_redo_step:  # the engine reduces in this backward: agree before it
                _agree(backend, optimizer, total, "")
            backend.backward(loss, model, last)
        except torch.OutOfMemoryError as err:
            if not agree_here:
                raise
            failed = str(err).splitlines()[0] if str(err) else "out of memory"
            break
    if backend.can_redo_step:
        _agree(backend, optimizer, total, failed)
    return total.item(), backend.step(model, optimizer, clip_value)


class WindowOutOfMemory(torch.OutOfMemoryError):
    """Some process ran out of memory in this window; every process dropped it (OomRecovery redoes it)."""


def _agree(backend: TrainingEngine, optimizer: torch.optim.Optimizer, total: torch.Tensor, failed: str) -> None:
    """Whether every process's window ran (no out-of-memory error) with a finite loss: one all-reduce of
    both flags. Where not, the gradients are dropped on every process and the same error raised on each."""
    flags = backend.all_reduce_sum(torch.stack([torch.tensor(float(bool(failed)), device=total.device),
                                                (~torch.isfinite(total)).float()]))
    out_of_memory, nonfinite = (int(x) for x in flags.tolist())
    if out_of_memory or nonfinite:
        optimizer.zero_grad(set_to_none=True)
    if out_of_memory:
        raise WindowOutOfMemory(failed or f"out of memory on {out_of_memory} of {backend.world_size} processes "
                                "(another process): this one dropped the window too")
    if nonfinite:
        raise NonFiniteLoss(f"the loss is {total.item()} (not finite) on at least one process")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of optimizer step `step` (0-based) in a linear warm-up over
    `warmup_steps`: 1/warmup_steps, 2/warmup_steps, ..., then 1."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


@contextlib.contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, factor: float):
    """The optimizer's rates times `factor` for one step, then the scheduler's own again (StepLR reads and
    sets them per epoch, so they must be its values between steps)."""
    if factor == 1.0:
        yield
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


class NonFiniteLoss(RuntimeError):
    """A window's loss was inf or NaN; its optimizer step was not taken."""


class OutOfMemoryAtOne(RuntimeError):
    """Even a micro-batch of one study does not fit, after every retry (or the engine cannot redo a step)."""


@dataclass
class OomRecovery:
    """Runs work in micro-batches (optimizer steps, generation); on out-of-memory, frees everything,
    halves the micro-batch (for a step: doubling the accumulation, so the effective batch stays) and
    redoes the same samples.

    At a micro-batch of 1 it waits and retries `retries` times (another process may free memory),
    then raises OutOfMemoryAtOne for the loop to save and stop.
    """

    micro_batch: int
    retries: int = 3
    wait_s: float = 5.0
    recoveries: int = 0
    events: list[dict] = field(default_factory=list)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: TrainingEngine, batch: dict,
             clip_value: float) -> tuple[float, bool]:
        if not backend.can_redo_step:
            try:
                return train_step(model, optimizer, backend, batch, clip_value, self.micro_batch)
            except torch.OutOfMemoryError as err:
                raise OutOfMemoryAtOne(f"out of memory at micro-batch {self.micro_batch} under {backend.name}, which "
                                       "keeps a failed step's partial gradients inside its engine, so the step cannot "
                                       f"be redone smaller ({str(err).splitlines()[0] if str(err) else 'no message'})"
                                       ) from None
        return self.run(lambda micro: train_step(model, optimizer, backend, batch, clip_value, micro),
                        lambda: release_memory(backend, optimizer, model))

    def run(self, work: Callable[[int], T], release: Callable[[], None]) -> T:
        """work(micro_batch), retried with half the micro-batch after each out-of-memory error."""
        failures_at_one = 0
        while True:
            try:
                return work(self.micro_batch)
            except torch.OutOfMemoryError as err:
                message = str(err).splitlines()[0] if str(err) else "out of memory"
            # Outside the except block: the traceback no longer pins the step's tensors.
            release()
            if self.micro_batch == 1:
                failures_at_one += 1
                if failures_at_one > self.retries:
                    raise OutOfMemoryAtOne(f"out of memory at micro-batch 1 after {self.retries} retries: {message}")
                time.sleep(self.wait_s)
                continue
            before, self.micro_batch = self.micro_batch, self.micro_batch // 2
            self.recoveries += 1
            self.events.append({"oom/micro_batch_from": before, "oom/micro_batch_to": self.micro_batch,
                                "oom/message": message})


CUDA_CONTEXT_GIB = 0.5
"""GPU memory a process holds outside torch's allocator (CUDA context, library handles), about."""


def cap_gpu_memory(device: torch.device, max_vram_gib: float) -> None:
    """--max-vram: the allocator raises out-of-memory beyond the cap minus the context's share, as a
    card of that size would (0 = no cap)."""
    if not max_vram_gib:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max((max_vram_gib - CUDA_CONTEXT_GIB) * GIB / total, 0.01), 1.0),
                                               index)


def start_gpu_memory(device: torch.device, max_vram_gib: float) -> None:
    """Before the first step, on a GPU: the --max-vram cap, and the peak memory counted from here."""
    if device.type == "cuda":
        cap_gpu_memory(device, max_vram_gib)
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(backend: TrainingEngine, optimizer: torch.optim.Optimizer | None = None,
                   model: torch.nn.Module | None = None) -> None:
    """Drop partial gradients, the model's captured CUDA graphs and cached blocks after an out-of-memory error."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if model is not None:
        release_graphs(backend.unwrap(model))
    gc.collect()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()
