"""Metrics and generated reports from any run's checkpoint, whichever engine wrote it.

Every resumable state holds the full model weights and the run's configuration and vocabulary
(plain/fp8: step-N.pt; DeepSpeed and Accelerate: step-N/loop.pt beside the engine's own files;
best.pt), so one reader serves them all. The data set is the run's own (its config.json) unless
--ann-path names another with the same report format.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from r2gen.atomic import write_json
from r2gen.checkpoint import CheckpointStore, UnreadableCheckpoint, load_checkpoint
from r2gen.config import TrainConfig
from r2gen.data.datasets import SPLITS
from r2gen.errors import ConfigError


@dataclass
class CheckpointEvaluation:
    checkpoint: Path
    split: str
    beam_size: int
    step: int
    scores: dict[str, float | None]
    samples_per_s: float
    records: list[dict] = field(default_factory=list)
    output: Path | None = None


def resolve_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(the state file to read, the run directory it belongs to or None) for a checkpoint file, an
    engine checkpoint folder, or a run directory (its best.pt, else its newest intact state)."""
    if not path.exists():
        raise ConfigError(f"--checkpoint: {path} does not exist")
    state = path
    if path.is_dir():
        if (path / "loop.pt").is_file():
            state = path / "loop.pt"
        elif (path / "checkpoints").is_dir():
            best = path / "checkpoints" / "best.pt"
            newest, _ = CheckpointStore(path / "checkpoints").newest_intact()
            state = best if best.is_file() else newest
            if state is None:
                raise ConfigError(f"--checkpoint: {path} holds no intact checkpoint")
            state = state / "loop.pt" if state.is_dir() else state
        else:
            raise ConfigError(f"--checkpoint: {path} is neither a checkpoint nor a run directory")
    run_dir = next((p for p in state.parents if (p / "config.json").is_file() and (p / "tokenizer.json").is_file()),
                   None)
    return state, run_dir


def read_state(state_path: Path) -> dict:
    try:
        state = load_checkpoint(state_path)  # weights-only: a foreign pickle's code never runs
    except UnreadableCheckpoint as exc:  # truncated, foreign, not a torch file at all, or code in it
        raise ConfigError(f"--checkpoint: {exc}") from None
    if not isinstance(state, dict) or not {"model", "config", "tokenizer"} <= state.keys():
        raise ConfigError(f"--checkpoint: {state_path} is not an r2gen-launch checkpoint (no model, config and "
                          "vocabulary)")
    return state


def evaluate_checkpoint(checkpoint: Path, split: str = "test", beam_size: int | None = None,
                        device: str | None = None, precision: str | None = None, ann_path: Path | None = None,
                        image_dir: Path | None = None, num_workers: int | None = None,
                        output: Path | None = None) -> CheckpointEvaluation:
    """Generate the split's reports with the checkpoint's weights; scores and writes them (JSON)."""
    import torch

    from backends.registry import build_backend
    from r2gen.data.datasets import load_annotation
    from r2gen.data.tokenizer import Tokenizer
    from r2gen.model.r2gen import R2GenModel
    from r2gen.build import Prepared
    from r2gen.data.loader import build_loader
    from r2gen.evaluate import evaluate

    if split not in SPLITS:
        raise ConfigError(f"--split: unknown {split!r}; choose one of {', '.join(SPLITS)}")
    if beam_size is not None and beam_size < 1:
        raise ConfigError(f"--beam-size: must be at least 1, got {beam_size}")
    state_path, run_dir = resolve_checkpoint(checkpoint)
    state = read_state(state_path)
    if ann_path is None and run_dir is None:
        raise ConfigError(f"--ann-path: {state_path} has no run directory (config.json) above it; name the data set")
    cfg = TrainConfig.from_dict(state["config"])
    cfg = cfg.replace(beam_size=beam_size or cfg.beam_size, micro_batch=0,
                      num_workers=cfg.num_workers if num_workers is None else num_workers, cache_images=False)
    if ann_path is None:
        facts = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        ann_path, image_dir = Path(facts["annotation"]), image_dir or Path(facts["image_dir"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = build_backend("plain", device, precision or ("bf16" if device == "cuda" else "fp32"))
    annotation = load_annotation(ann_path, image_dir, cfg.model.dataset, progress=True)
    tokenizer = Tokenizer.from_json(state["tokenizer"])
    model = R2GenModel(cfg.model, len(tokenizer))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ConfigError(f"--checkpoint: {state_path}'s weights do not fit its own configuration: "
                          f"{str(exc).splitlines()[0]}") from None
    model.to(backend.device)
    prep = Prepared(cfg, backend, annotation, tokenizer, model, f"checkpoint {state_path}")
    began = time.perf_counter()
    scores, records, speed = evaluate(model, build_loader(prep, split, train=False), backend, tokenizer, cfg)
    result = CheckpointEvaluation(state_path, split, cfg.beam_size, int(state.get("step", 0)), scores, speed, records)
    name = state_path.parent.name if state_path.name == "loop.pt" else state_path.stem
    result.output = output or (run_dir or state_path.parent) / "reports" / f"evaluate-{split}-{name}-beam{cfg.beam_size}.json"
    result.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(result.output, {"checkpoint": str(state_path), "split": split, "beam_size": cfg.beam_size,
                               "step": result.step, "scores": scores, "generate_samples_per_s": speed,
                               "seconds": time.perf_counter() - began, "device": str(backend.device),
                               "precision": backend.precision, "reports": records})
    return result
