"""What the shared loop needs of an engine: the `TrainingEngine` protocol, the one declaration of the
engine interface. backends.base.Backend implements it (the parts every adapter shares) and each
adapter in backends/ the rest.

r2gen imports nothing from backends/: the loop, the step, evaluation and the speed-ups see an engine
only through these members. It never asks which engine it runs on; where engines differ in what
they allow, it reads a capability (`cuda_graphs`, `flat_parameters`, `can_redo_step`, `saves_engine`).
"""

from __future__ import annotations

from abc import abstractmethod
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
    """An engine adapter as the loop uses it: prepare the model, run each micro-batch's forward under
    `autocast` and its `backward`, `step` after the window's last, save and restore its state."""

    name: str
    """For messages only: the loop never branches on it."""
    device: torch.device
    precision: str
    world_size: int
    rank: int
    can_redo_step: bool
    """After an out-of-memory error, dropping the gradients (optimizer.zero_grad) undoes the failed
    step's partial work, so the loop may redo it in smaller micro-batches: `backward` keeps gradients
    in this process and `step` reduces them, so every process can drop a window together."""
    saves_engine: bool
    """Model and optimizer state live in the engine's own checkpoint (every process writes its part
    with `save_engine`) instead of the loop's state dict."""
    cuda_graphs: bool
    """The step calls the model's own forward in this process, so r2gen.speedups may capture it in
    CUDA graphs (one process only); an adapter that wraps or swaps modules does not."""
    flat_parameters: bool
    """The engine owns the parameters' storage (views of one flat buffer), so their layout must not
    change after `prepare` (no channels_last)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes, evaluates and shows progress."""

    @abstractmethod
    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Move/convert/wrap the model, build its optimizer; returns the objects the loop must use
        (the optimizer's param_groups drive the LR scheduler and the logged learning rates)."""

    @abstractmethod
    def autocast(self) -> AbstractContextManager:
        """Context for forward passes in this engine's precision."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, model: torch.nn.Module, last: bool) -> None:
        """One micro-batch's backward; `last`: the window's last. Engines that can redo a step keep the
        gradients in this process (no all-reduce), so a window is dropped by every process together
        (r2gen.step.train_step agrees first); `step` reduces them."""

    @abstractmethod
    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_value: float) -> bool:
        """After the window's last backward: reduce over processes, clip values, step, zero the gradients.
        False when the optimizer step was skipped (an fp16 overflow), True otherwise."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain model inside whatever wrapper `prepare` returned."""

    def state_dict(self) -> dict:
        """Engine state to checkpoint beside model and optimizer (e.g. the loss scaler)."""

    def load_state_dict(self, state: dict) -> None: ...

    def save_engine(self, model: torch.nn.Module, folder: Path) -> None:
        """Where `saves_engine`: this process's part of the engine's own checkpoint."""

    def load_engine(self, model: torch.nn.Module, folder: Path) -> None: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all processes."""

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's flag on every process (e.g. early stopping, decided where evaluation runs)."""

    def gather(self, value: object) -> list:
        """`value` from every process in rank order, on every process (picklable objects)."""

    def barrier(self) -> None: ...

    def describe(self) -> str:
        """One line for the plan and config.json: engine, device, precision, processes."""
