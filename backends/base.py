"""What every engine adapter shares: `Backend`, the implementation of r2gen.engine.TrainingEngine (the
interface, declared there once) with the capabilities' defaults and the several-process collectives.
Each adapter sets its capabilities on its class and implements `prepare`, `autocast`, `backward`
and `step`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from r2gen.engine import TrainingEngine


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


class Backend(TrainingEngine):
    """The capabilities' defaults (an adapter sets its own on its class) and the shared members."""

    world_size: int = 1
    rank: int = 0
    can_redo_step: bool = True
    cuda_graphs: bool = False
    flat_parameters: bool = False
    saves_engine: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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
        return model

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_engine(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps its state in the loop's checkpoint")

    def load_engine(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError(f"{self.name} keeps its state in the loop's checkpoint")

    # -- several processes: torch.distributed, joined by the adapter; no-ops for one process ------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        total = value.detach().clone().to(self.device)
        torch.distributed.all_reduce(total)
        return total

    def broadcast_flag(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        torch.distributed.broadcast(value, src=0)
        return bool(value.item())

    def gather(self, value: object) -> list:
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
