"""What the shared loop needs of an engine: the `TrainingEngine` protocol the adapters in backends/ fulfil.

r2gen imports nothing from backends/: the loop, the step, evaluation and the speed-ups see an engine
only through these members. It never asks which engine it runs on; where engines differ in what
they allow, it reads a capability (`cuda_graphs`, `flat_parameters`, `can_redo_step`, `saves_engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]
"""Builds the run's optimizer for a model (r2gen.build.optimizer_factory): adapters that swap
modules (FP8) or optimizers (DeepSpeed offload) call it at the right moment."""

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each mixed precision (fp32 runs without autocast)."""


class TrainingEngine(Protocol):
    """An engine adapter as the loop uses it (backends.base.Backend and its subclasses)."""

    name: str
    """For messages only: the loop never branches on it."""
    device: torch.device
    precision: str
    world_size: int
    rank: int
    can_redo_step: bool
    """After an out-of-memory error, dropping the gradients undoes the failed step's partial work,
    so the step may be redone in smaller micro-batches: `backward` keeps gradients in this process
    and `step` reduces them, so every process can drop a window together."""
    saves_engine: bool
    """Model and optimizer state live in the engine's own checkpoint (`save_engine`, every process)."""
    cuda_graphs: bool
    """The step runs the model's own forward in this process, so its encoder-decoder may be captured
    in CUDA graphs (r2gen.speedups; one process only)."""
    flat_parameters: bool
    """The engine owns the parameters' storage (one flat buffer), so their layout must not change
    after `prepare` (no channels_last)."""

    @property
    def is_main(self) -> bool: ...

    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]: ...

    def autocast(self) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor, model: torch.nn.Module, last: bool) -> None:
        """One micro-batch's backward; where can_redo_step, without communication between processes."""

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_value: float) -> bool:
        """Reduce the window over processes, clip values, step; False when an fp16 overflow skipped it."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_engine(self, model: torch.nn.Module, folder: Path) -> None: ...

    def load_engine(self, model: torch.nn.Module, folder: Path) -> None: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def broadcast_flag(self, flag: bool) -> bool: ...

    def gather(self, value: object) -> list: ...

    def barrier(self) -> None: ...

    def describe(self) -> str: ...
