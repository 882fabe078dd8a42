"""The one small surface the shared loop uses to drive an engine (r2gen.engine.TrainingEngine).

The loop never asks which backend it runs on: it calls `prepare`, `autocast`, `backward`, `step`,
`state_dict`/`load_state_dict`, and reads `device`, `is_main`, `world_size` and the capabilities
(`can_redo_step`, `saves_engine`, `cuda_graphs`, `flat_parameters`) each adapter sets on its class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from r2gen.engine import OptimizerFactory


REDUCE_BUCKET_BYTES = 64 * 2**20
"""Tensors reduced or broadcast per call (Backend.reduce_window, share_first_weights): a flat copy this large at a time."""


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, each group up to `limit` bytes (one larger tensor alone)."""
    groups: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if groups and (groups[-1][0].dtype, groups[-1][0].device) == (t.dtype, t.device) \
                and size + t.nbytes <= limit:
            groups[-1].append(t)
            size += t.nbytes
        else:
            groups.append([t])
            size = t.nbytes
    return groups


def _collective(tensors: list[torch.Tensor], how: str) -> None:
    """Average over processes ("average") or rank 0's values ("broadcast"), in place, one flat bucket at a time."""
    for bucket in _buckets(tensors, REDUCE_BUCKET_BYTES):
        flat = torch._utils._flatten_dense_tensors(bucket)
        if how == "average":
            torch.distributed.all_reduce(flat)
            flat.div_(torch.distributed.get_world_size())
        else:
            torch.distributed.broadcast(flat, src=0)
        for tensor, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
            tensor.copy_(value)


def step_was_taken(scaler: torch.amp.GradScaler | None, step: Callable[[], object]) -> bool:
    """Runs `step` (the optimizer step and the scaler's update) and says whether the optimizer stepped.
    With a loss scaler the scale only drops when the step was skipped (an fp16 overflow). The scale is
    the one sign that holds for a fused Adam too: GradScaler calls its step even on an overflow (the
    kernel skips the update itself), so a flag set by "was step called" never sees the skip."""
    if scaler is None:
        step()
        return True
    scale = scaler.get_scale()
    step()
    return scaler.get_scale() >= scale


class Backend(ABC):
    name: str
    device: torch.device
    precision: str
    world_size: int = 1
    rank: int = 0
    can_redo_step: bool = True
    """After an out-of-memory error, dropping the gradients (optimizer.zero_grad) undoes the failed
    step's partial work, so the loop may redo it in smaller micro-batches."""
    cuda_graphs: bool = False
    """The step calls the model's own forward in this process, so r2gen.speedups may capture its
    encoder-decoder in CUDA graphs (one process only); an adapter that wraps or swaps modules does not."""
    flat_parameters: bool = False
    """The engine owns the parameters' storage (views of one flat buffer), so their layout must not
    change after prepare: no channels_last."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Move/convert/wrap the model, build its optimizer; returns the objects the loop must use
        (the optimizer's param_groups drive the LR scheduler and the logged learning rates)."""

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """Context for forward passes in this backend's precision."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, model: torch.nn.Module, last: bool) -> None:
        """One micro-batch's backward; `last`: the window's last. Engines that can redo a step keep the
        gradients in this process (no all-reduce), so a window is dropped by every process together
        (r2gen.step.train_step agrees first); `step` reduces them."""

    @abstractmethod
    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_value: float) -> bool:
        """After the window's last backward: reduce over processes, clip values, step, zero the gradients.

        Returns False when the optimizer step was skipped (fp16 overflow), True otherwise.
        """

    # Several processes train one model without DistributedDataParallel's wrapper: its forward and
    # backward hold collectives (bucket rebuilds, gradient buckets) that an out-of-memory error on one
    # process would leave the others waiting in. These two are the only gradient and weight traffic.
    def share_first_weights(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every process (at prepare). One process: nothing."""
        if self.world_size > 1:
            _collective([p.data for p in model.parameters()] + list(model.buffers()), "broadcast")

    def reduce_window(self, model: torch.nn.Module) -> None:
        """The window's gradients averaged over processes (as DDP averages them) and rank 0's buffers
        (BatchNorm's running statistics) on every process, in buckets of REDUCE_BUCKET_BYTES. One
        process: nothing."""
        if self.world_size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this window did not reach: a zero share, as DDP's
                p.grad = torch.zeros_like(p)
        _collective([p.grad for p in params], "average")
        _collective(list(model.buffers()), "broadcast")

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain model inside whatever wrapper prepare() returned."""
        return model

    def state_dict(self) -> dict:
        """Engine state to checkpoint beside model and optimizer (e.g. the loss scaler)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    saves_engine: bool = False
    """Whether model and optimizer state live in the engine's own checkpoint (every process writes
    its part with `save_engine`) instead of the loop's state dict."""

    def save_engine(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps its state in the loop's checkpoint")

    def load_engine(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps its state in the loop's checkpoint")

    # -- several processes: torch.distributed, joined by the adapter; no-ops for one process ------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all processes."""
        if self.world_size == 1:
            return value
        total = value.detach().clone().to(self.device)
        torch.distributed.all_reduce(total)
        return total

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag on every process (e.g. early stopping, decided where evaluation runs)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def gather(self, value: object) -> list:
        """`value` from every process in rank order, on every process (picklable objects)."""
        if self.world_size == 1:
            return [value]
        values: list = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"
