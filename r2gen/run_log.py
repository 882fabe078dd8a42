"""What the loop writes and prints while it runs: metrics.jsonl (and W&B, TensorBoard), the progress bar,
the epoch line.

`MetricsLog` appends one JSON object per record; `EpochClock` measures an epoch's wall time, the
loader waits and each log window's throughput; a terminal shows the progress bar, a log file (nohup,
a scheduler) one `epoch_line` per epoch instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r2gen.config import TrainConfig
from r2gen.model.r2gen import target_tokens
from r2gen.state import LoopState
from r2gen.tensorboard_log import TensorBoardSink
from r2gen.wandb_log import WandbSink, wandb_config


class Sink(Protocol):
    """Somewhere else the records go: Weights & Biases, TensorBoard."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only metrics.jsonl; one JSON object per line with stable keys; the same records to
    each sink given (--wandb, --tensorboard)."""

    def __init__(self, path: Path | None, sinks: Sequence[Sink] = ()):
        self.path = path  # None: a process other than rank 0, which writes nothing
        self.sinks = tuple(sinks)

    @classmethod
    def of_run(cls, run_dir: Path, cfg: TrainConfig, plan_json: str | None) -> "MetricsLog":
        """The run directory's metrics.jsonl, and Weights & Biases (--wandb) and TensorBoard
        (--tensorboard) where cfg asks for them."""
        config = wandb_config(cfg.to_dict(), plan_json)
        sinks: list[Sink] = []
        if cfg.wandb:
            sinks.append(WandbSink(run_dir, cfg.wandb_mode, cfg.wandb_project, cfg.wandb_name, config))
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(run_dir, config))
        return cls(run_dir / "metrics.jsonl", sinks)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {**record, "time/unix_s": round(time.time(), 3)}  # wall clock: time to a score, across resumes
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class EpochClock:
    """An epoch's wall time and its waits for the loader; the current log window's studies, tokens and wait."""

    def __init__(self) -> None:
        self.began = self.banked = self.ready_at = self.window_start = time.perf_counter()
        self.wait_s = self.window_wait = 0.0
        self.window_samples = self.window_tokens = 0
        self.warned = False  # the data-wait warning: once per epoch

    def got_batch(self) -> None:
        """A batch arrived: the step waited for the loader since it was last ready."""
        waited = time.perf_counter() - self.ready_at
        self.window_wait += waited
        self.wait_s += waited

    def ready(self) -> None:
        """The step is ready for its next batch: from now on it waits for data."""
        self.ready_at = time.perf_counter()

    def count_window(self, batch: dict) -> None:
        self.window_samples += len(batch["ids"])
        self.window_tokens += int(target_tokens(batch["masks"]).item())

    def close_window(self) -> dict[str, float]:
        """The log window's throughput and data wait (metrics keys); the next window starts now."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        rates = {"perf/samples_per_s": self.window_samples / elapsed, "perf/tokens_per_s": self.window_tokens / elapsed,
                 "perf/data_wait_pct": 100 * self.window_wait / elapsed}
        self.window_samples, self.window_tokens, self.window_wait, self.window_start = 0, 0, 0.0, now
        return rates

    def bank(self, loop: LoopState) -> None:
        """The training time since the last bank, into loop.train_time_s (saved: samples/s across resumes)."""
        now = time.perf_counter()
        loop.train_time_s += now - self.banked
        self.banked = now

    def elapsed(self) -> float:
        """Seconds since the epoch began."""
        return max(time.perf_counter() - self.began, 1e-9)


def learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """The two parameter groups' learning rates as a step used them: the scheduler's times the warm-up factor."""
    return {"lr/visual_extractor": optimizer.param_groups[0]["lr"] * factor,
            "lr/encoder_decoder": optimizer.param_groups[1]["lr"] * factor}


def window_status(epoch: int, epochs: int, loss: float, rates: dict[str, float]) -> str:
    """The progress bar's text after a log window (rates: EpochClock.close_window's)."""
    return (f"epoch {epoch}/{epochs} loss {loss:.3f} {rates['perf/samples_per_s']:.1f} samples/s, "
            f"data wait {rates['perf/data_wait_pct']:.0f}%")


def progress_bar(console: Console) -> Progress:
    # Not a terminal (nohup, a batch scheduler's log): no bar, which would print only at the end;
    # the loop prints one epoch_line per epoch instead.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(epoch: int, epochs: int, steps: int, loss: float, samples_per_s: float, data_wait_pct: float,
               epoch_s: float, scores: dict[str, float | None] | None = None) -> str:
    """The plain line printed after each epoch when the output is not a terminal; ETA from this
    epoch's wall time (evaluation and checkpoints included) times the epochs left."""
    line = (f"epoch {epoch}/{epochs} | step {steps} | loss {loss:.4f} | {samples_per_s:.1f} samples/s | "
            f"data wait {data_wait_pct:.0f}% | {epoch_s:.1f} s")
    if scores:
        names = {"findings_macro_f1": "findings F1"}
        line += " | val " + " ".join(f"{names.get(k, k)} {v:.4f}" for k, v in scores.items() if v is not None)
    return line + f" | ETA {_clock(epoch_s * (epochs - epoch))}"
