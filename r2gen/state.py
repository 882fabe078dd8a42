"""Where a run stands between steps and across a restart: `LoopState`, the random states, a stop request.

A resumable checkpoint holds the LoopState and every process's random states (r2gen.checkpoint),
so a continued run takes the steps the uninterrupted one would have taken. SIGTERM or Ctrl-C is
noted by `StopRequest` and acted on after the current step: the state is saved and `Stopped` raised.
"""

from __future__ import annotations

import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r2gen.errors import RunFailed

MONITOR = "BLEU_4"
"""The val score that picks the best checkpoint (best.pt) and stops early."""


@dataclass
class LoopState:
    """Where the loop stands, besides model, optimizer, scheduler and engine: what a resumed run
    needs to continue exactly (saved in every resumable checkpoint)."""

    epoch: int = 1                  # the epoch in progress
    position: int = 0               # its loader batches (accumulation windows) already done
    steps: int = 0                  # optimizer steps so far, all epochs
    best_score: float = -float("inf")
    best_epoch: int = 0
    epoch_loss: float = 0.0         # the epoch in progress: sum of step losses, skipped steps, samples
    skipped: int = 0
    nonfinite: int = 0              # windows with a non-finite loss this epoch; and in a row, all epochs
    nonfinite_run: int = 0
    epoch_samples: int = 0
    train_samples: int = 0
    train_time_s: float = 0.0
    metrics_bytes: int = 0          # metrics.jsonl's length at the save: a resume drops what came after

    def count_window(self, samples: int, loss: float, stepped: bool) -> None:
        """A window trained: its step (or a skipped one: an fp16 overflow), loss and studies."""
        self.skipped += not stepped
        self.epoch_loss += loss
        self.steps += 1
        self.position += 1
        self.train_samples += samples
        self.epoch_samples += samples

    def count_nonfinite(self) -> None:
        """A window consumed without a step: its loss was not finite."""
        self.nonfinite += 1
        self.nonfinite_run += 1
        self.steps += 1
        self.position += 1

    def improves(self, score: float | None, epoch: int) -> bool:
        """Whether `score` (val MONITOR) beats the best so far; if so it becomes the best, of `epoch`."""
        improved = score is not None and score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
        return improved

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0
        self.epoch_loss, self.skipped, self.nonfinite, self.epoch_samples = 0.0, 0, 0, 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Stopped(RunFailed):
    """Stopped by a signal after saving; --keep-training continues."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """SIGTERM or Ctrl-C during training: noted, acted on after the current optimizer step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame: object) -> None:
        if self.signal is not None and signum == 2:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stopped(self, step: int, saved: Path | None) -> Stopped:
        """The error that ends the run after `step`, whose state was saved to `saved`."""
        name = {2: "Ctrl-C", 15: "SIGTERM"}.get(self.signal or 0, "a signal")
        return Stopped(f"stopped by {name} after step {step}; saved {saved}. Continue with "
                       "the same command and --keep-training", self.signal or 15)
