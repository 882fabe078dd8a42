"""TensorBoard: the same records as metrics.jsonl, as scalars in event files under <run>/tb.

Every number of a record (booleans as 0/1) is a scalar at the record's step, its wall time the
record's time/unix_s (kept in full there: as a float32 scalar it would be rounded to minutes); the
training configuration and the plan are a text entry. A continued run (--keep-training) appends a
new event file to the same folder. Nothing imports tensorboard unless --tensorboard is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from r2gen.errors import ConfigError

WALL_TIME_KEY = "time/unix_s"
"""The record's key that TensorBoard keeps as each event's wall time rather than as a scalar."""


def check_tensorboard() -> None:
    """Refuse --tensorboard where the package is missing, before anything is written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard: the tensorboard package is not installed "
                          "(pip install 'r2gen-launch[tensorboard]', or pip install tensorboard)") from None
    del SummaryWriter


class TensorBoardSink:
    """One event file per (continued) training run in <run>/tb (rank 0 only)."""

    def __init__(self, run_dir: Path, config: dict) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        # Four leading spaces: a Markdown code block, so the text dashboard keeps the JSON's indentation.
        text = "\n".join("    " + line for line in json.dumps(config, indent=2, sort_keys=True).splitlines())
        self.writer.add_text("config", text, global_step=0)
        self.writer.flush()

    def log(self, record: dict) -> None:
        """Numbers (booleans as 0/1) at the record's step; None and text are left out. Flushed at
        once: a run killed later leaves every record written so far readable."""
        step, wall = int(record["step"]), record.get(WALL_TIME_KEY)
        for key, value in record.items():
            if key not in ("step", WALL_TIME_KEY) and isinstance(value, (int, float)):
                self.writer.add_scalar(key, float(value), global_step=step, walltime=wall)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
