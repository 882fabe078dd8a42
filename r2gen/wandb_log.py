"""Weights & Biases: the same records as metrics.jsonl, and the plan as the run's config.

Offline by default (files under <run>/wandb, `wandb sync` uploads them later); online only with
`--wandb-mode online` and WANDB_API_KEY in the environment, the one place a key is read from. A
continued run (--keep-training) logs into the same W&B run: its id is kept in <run>/wandb-id.txt.
Nothing imports wandb unless --wandb is asked for.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from r2gen.errors import ConfigError

WANDB_MODES = ("offline", "online")


def check_wandb(mode: str) -> None:
    """Refuse a W&B request this machine cannot serve, before anything is written (the mode itself
    is checked with the rest of the configuration, r2gen.config)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb: the wandb package is not installed (pip install wandb)") from None
    del wandb
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("--wandb-mode online: set WANDB_API_KEY in the environment (the key is read from there "
                          "only), or use --wandb-mode offline and `wandb sync` later")


class WandbSink:
    """One W&B run per training run (rank 0 only)."""

    def __init__(self, run_dir: Path, mode: str, project: str, name: str, config: dict) -> None:
        import wandb

        check_wandb(mode)
        id_file = run_dir / "wandb-id.txt"
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run = wandb.init(project=project, name=name or run_dir.name, mode=mode, dir=str(run_dir), id=run_id,
                              resume="allow", config=config,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, record: dict) -> None:
        """Numbers (booleans as 0/1) at the record's step; None and text are left out."""
        values = {k: float(v) for k, v in record.items()
                  if k not in ("step",) and isinstance(v, (int, float)) and v is not None}
        if values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def wandb_config(train_config: dict, plan_json: str | None) -> dict:
    """The run's W&B config: the training configuration and the launcher's plan."""
    return {"train": train_config, "plan": json.loads(plan_json) if plan_json else None}
