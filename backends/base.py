"""The one small surface the shared loop uses to drive an engine.

The loop never asks which backend it runs on: it calls `prepare`, `autocast`, `backward_and_step`,
`state_dict`/`load_state_dict`, and reads `device`, `is_main`, `world_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager

import torch


class Backend(ABC):
    name: str
    device: torch.device
    precision: str
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Move/wrap model and optimizer for this engine; returns the objects the loop must use."""

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """Context for forward passes in this backend's precision."""

    @abstractmethod
    def backward_and_step(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          clip_value: float, step: bool = True) -> bool:
        """Backward; if `step` (last micro-batch of an accumulation window), clip and step.

        Returns False when the optimizer step was skipped (fp16 overflow), True otherwise.
        """

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain model inside whatever wrapper prepare() returned."""
        return model

    def state_dict(self) -> dict:
        """Engine state to checkpoint beside model and optimizer (e.g. the loss scaler)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- several processes (DDP); single-process defaults ----------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all processes."""
        return value

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag on every process (e.g. early stopping, decided where evaluation runs)."""
        return flag

    def barrier(self) -> None:
        pass

    def train_sampler(self, dataset, seed: int):
        """A sampler giving this process its share of a shuffled epoch, or None (one process)."""
        return None

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.precision})"
