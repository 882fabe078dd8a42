"""--keep-training: which run to continue, whether it can be, and its batch after re-planning.

Pure checks on the run directory's files (plan.json, config.json, the checkpoint manifest); each
refusal is a UsageError naming the flag (exit 2) before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.plan import USER_MICRO_BATCH, BatchPlan, Plan
from r2gen.checkpoint import CheckpointStore
from r2gen.config import STEP_SPEEDUPS, TrainConfig
from r2gen.errors import BackendError, ConfigError


@dataclass(frozen=True)
class RunToContinue:
    path: Path                 # the run directory
    plan: Plan                 # its plan.json
    cfg: TrainConfig           # the configuration it trained with (config.json)
    annotation: str
    image_dir: str
    checkpoint: Path           # the newest intact resumable checkpoint
    warnings: tuple[str, ...]  # newer checkpoints skipped, and why
    init_from: str | None = None  # a fine-tune's start checkpoint (config.json), its vocabulary the run's own
    weights_source: str = ""      # where its weights came from, as config.json records it


def find_run(run_dir: Path, name: str | None) -> Path:
    """--run-dir/--name, or the most recently written run in --run-dir."""
    if name is not None:
        target = run_dir / name
        if not target.is_dir() or not any(target.iterdir()):
            raise ConfigError(f"--keep-training: {target} does not exist or is empty; nothing to continue")
        return target
    runs = [p for p in run_dir.iterdir() if (p / "plan.json").is_file()] if run_dir.is_dir() else []
    if not runs:
        raise ConfigError(f"--keep-training: no run in {run_dir} to continue (give --run-dir, or start a run "
                          "without --keep-training)")
    return max(runs, key=lambda p: (p / "plan.json").stat().st_mtime)


def is_run(target: Path) -> bool:
    """Whether a folder holds an r2gen-launch run (its plan.json and config.json)."""
    return (target / "plan.json").is_file() and (target / "config.json").is_file()


def read_run(target: Path) -> RunToContinue:
    """The run's plan, configuration and newest intact checkpoint, or a refusal."""
    plan_path, config_path = target / "plan.json", target / "config.json"
    if not is_run(target):
        raise ConfigError(f"--keep-training: {target} is not an r2gen-launch run (no plan.json and config.json)")
    try:
        plan = Plan.from_json(plan_path.read_text(encoding="utf-8"))
        config = json.loads(config_path.read_text(encoding="utf-8"))
        cfg = TrainConfig.from_dict(config["train"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--keep-training: {target}'s plan.json or config.json is unreadable "
                          f"({type(err).__name__}: {err})") from None
    checkpoint, warnings = CheckpointStore(target / "checkpoints").newest_intact()
    if checkpoint is None:
        detail = f" ({'; '.join(warnings)})" if warnings else ""
        raise ConfigError(f"--keep-training: {target} holds no intact checkpoint to continue from{detail}")
    return RunToContinue(target, plan, cfg, config["annotation"], config["image_dir"], checkpoint, tuple(warnings),
                         config.get("init_from"), config.get("visual_weights") or "")


def check_request(run: RunToContinue, backend: str, preset: str | None, overrides: dict[str, Any]) -> None:
    """The command and flags must describe the run being continued: a different engine, preset or
    model setting is a new run, not a continuation."""
    stored = run.plan.backend
    if backend not in ("auto", stored):
        raise ConfigError(f"--keep-training: {run.path} trained with the {stored} engine; continue it with "
                          f"`r2gen-launch {stored} --keep-training`")
    if preset is not None and preset != run.cfg.preset:
        raise ConfigError(f"--preset {preset}: {run.path} trained with the {run.cfg.preset} preset; drop the flag "
                          "to continue it, or start a new run")
    for key, value in overrides.items():
        if value is None or key in CHANGEABLE:
            continue
        current = getattr(run.cfg.model, key) if hasattr(run.cfg.model, key) else getattr(run.cfg, key)
        if value != current:
            raise ConfigError(f"--{key.replace('_', '-')} {value}: {run.path} trained with {current}; drop the flag "
                              "to continue it, or start a new run")


CHANGEABLE = ("epochs", "val_every", "early_stop", "beam_size", "log_every", "max_steps_per_epoch", "save_every",
              "checkpoint_every_min", "test_every",
              "keep_last", "wandb", "wandb_mode", "wandb_project", "wandb_name", "tensorboard", *STEP_SPEEDUPS)
"""Settings a continued run may change: how long it goes on, how it evaluates, logs and saves, and
the step's speed-ups (the same function)."""


def continued_config(run: RunToContinue, overrides: dict[str, Any], micro_batch: int) -> TrainConfig:
    """The run's own configuration with the changeable flags given and the re-planned micro-batch
    (the loader's window, window_size, stays: the same samples per step in the same order)."""
    changes = {k: v for k, v in overrides.items() if k in CHANGEABLE and v is not None}
    return run.cfg.replace(**changes, micro_batch=min(micro_batch, run.cfg.window_size))


def resume_batch(stored: BatchPlan, largest_micro: int) -> BatchPlan:
    """After re-probing: the micro-batch may change, the window (studies per process per optimizer
    step), the effective batch, the sample order and the learning rates stay. A micro-batch the user
    fixed with --micro-batch stays while it fits (BatchNorm's statistics depend on it)."""
    window = stored.micro_batch * stored.accumulation
    if largest_micro < 1:
        raise BackendError("--keep-training: not even one study fits the GPU memory now")
    user_fixed = any(flag in stored.reasons.get("micro_batch", "") for flag in (USER_MICRO_BATCH, "--batch-size"))
    micro = stored.micro_batch if user_fixed and largest_micro >= stored.micro_batch else min(largest_micro, window)
    accumulation = -(-window // micro)
    if micro == stored.micro_batch:
        return stored
    return replace(stored, micro_batch=micro, accumulation=accumulation,
                   reasons={**stored.reasons,
                            "micro_batch": f"{micro}: re-planned on --keep-training (was {stored.micro_batch}); "
                                           f"largest that fits now {largest_micro}",
                            "accumulation": f"{accumulation}: the same {window} studies per process per step"})
