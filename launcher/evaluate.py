"""Metrics and generated reports from any run's checkpoint, whichever engine wrote it, or from a
published R2Gen checkpoint; `open_checkpoint`, the one reader `evaluate` and `generate` share.

Every resumable state holds the full model weights and the run's configuration and vocabulary
(plain/fp8: step-N.pt; DeepSpeed and Accelerate: step-N/loop.pt beside the engine's own files;
best.pt), so one reader serves them all. The data set is the run's own (its config.json) unless
--ann-path names another with the same report format. A published file (the R2Gen authors'
model_iu_xray.pth, model_mimic_cxr.pth, or one of its trainer's) holds weights only: --ann-path
names the data set it was trained on, which gives its kind, configuration (that kind's preset) and
vocabulary (r2gen.pretrained).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from r2gen.atomic import write_json
from r2gen.clinical import write_labeler_inputs
from r2gen.checkpoint import CheckpointStore
from r2gen.config import TrainConfig, preset
from r2gen.data.datasets import SPLITS, Annotation, annotation_dataset, load_annotation
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import ConfigError
from r2gen.pretrained import Trained, is_published, load_weights, ours, published, read_checkpoint

if TYPE_CHECKING:
    from r2gen.model.r2gen import R2GenModel


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


def resolve_checkpoint(path: Path, flag: str = "--checkpoint") -> tuple[Path, Path | None]:
    """(the state file to read, the run directory it belongs to or None) for a checkpoint file, an
    engine checkpoint folder, or a run directory (its best.pt, else its newest intact state)."""
    if not path.exists():
        raise ConfigError(f"{flag}: {path} does not exist")
    state = path
    if path.is_dir():
        if (path / "loop.pt").is_file():
            state = path / "loop.pt"
        elif (path / "checkpoints").is_dir():
            best = path / "checkpoints" / "best.pt"
            newest, _ = CheckpointStore(path / "checkpoints").newest_intact()
            state = best if best.is_file() else newest
            if state is None:
                raise ConfigError(f"{flag}: {path} holds no intact checkpoint")
            state = state / "loop.pt" if state.is_dir() else state
        else:
            raise ConfigError(f"{flag}: {path} is neither a checkpoint nor a run directory")
    run_dir = next((p for p in state.parents if (p / "config.json").is_file() and (p / "tokenizer.json").is_file()),
                   None)
    return state, run_dir


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint of either format, read and checked; its model is built on asking (`model`)."""

    state_path: Path
    run_dir: Path | None
    trained: Trained
    cfg: TrainConfig
    annotation: Annotation | None  # a published file's: the data set its vocabulary was rebuilt from

    @property
    def tokenizer(self) -> Tokenizer:
        return self.trained.tokenizer

    def model(self) -> R2GenModel:
        """The model with the checkpoint's weights, on the CPU."""
        from r2gen.model.r2gen import R2GenModel

        model = R2GenModel(self.cfg.model, len(self.tokenizer))
        load_weights(model, self.trained, "--checkpoint")
        return model

    def inference_config(self, beam_size: int | None, num_workers: int | None) -> TrainConfig:
        """The configuration to generate with: `beam_size` and `num_workers` where given, else the
        checkpoint's; batches sized by evaluation's rule; no image cache."""
        return self.cfg.replace(beam_size=beam_size or self.cfg.beam_size, micro_batch=0, cache_images=False,
                                num_workers=self.cfg.num_workers if num_workers is None else num_workers)

    def output_path(self, kind: str, beam_size: int, suffix: str = "") -> Path:
        """<run>/reports/<kind>-<checkpoint>-beam<N><suffix>: in the checkpoint's run, else beside it."""
        name = self.state_path.parent.name if self.state_path.name == "loop.pt" else self.state_path.stem
        return (self.run_dir or self.state_path.parent) / "reports" / f"{kind}-{name}-beam{beam_size}{suffix}"


def check_beam_size(beam_size: int | None) -> None:
    if beam_size is not None and beam_size < 1:
        raise ConfigError(f"--beam-size: must be at least 1, got {beam_size}")


def inference_backend(device: str | None, precision: str | None):
    """The plain engine to generate with: the GPU where there is one, bf16 there and fp32 on a CPU,
    unless --device / --precision say otherwise."""
    from backends.registry import build_backend
    from launcher.hardware import default_device

    device = default_device(device)
    return build_backend("plain", device, precision or ("bf16" if device == "cuda" else "fp32"))


def open_checkpoint(checkpoint: Path, ann_path: Path | None = None, image_dir: Path | None = None,
                    check_images: bool = True) -> OpenedCheckpoint:
    """Weights, configuration and vocabulary of --checkpoint (any engine's, or a published R2Gen file),
    read weights-only. A published file needs `ann_path`, the data set it was trained on: loaded (its
    images checked where `check_images`), its kind read from its format, its vocabulary rebuilt and
    checked against the weights; the configuration is that kind's preset with the weights' sizes."""
    state_path, run_dir = resolve_checkpoint(checkpoint)
    state = read_checkpoint(state_path, "--checkpoint")  # weights-only: a foreign pickle's code never runs
    if not is_published(state):
        trained = ours(state, state_path)
        return OpenedCheckpoint(state_path, run_dir, trained, trained.config, None)  # type: ignore[arg-type]
    if ann_path is None:
        raise ConfigError(f"--ann-path: {state_path} is a published R2Gen checkpoint, which holds no vocabulary; "
                          "name the annotation.json of the data set it was trained on")
    dataset = annotation_dataset(ann_path)
    # Without check_images only the reports are read: any existing folder stands for the images'.
    annotation = load_annotation(ann_path, image_dir if check_images else Path(ann_path).parent, dataset,
                                 check_images=check_images, progress=check_images)
    cfg = preset(dataset)
    trained = published(state, state_path, "--checkpoint", annotation, cfg.model.max_seq_length)
    return OpenedCheckpoint(state_path, run_dir, trained, dataclasses.replace(cfg, model=trained.model), annotation)


def evaluate_checkpoint(checkpoint: Path, split: str = "test", beam_size: int | None = None,
                        device: str | None = None, precision: str | None = None, ann_path: Path | None = None,
                        image_dir: Path | None = None, num_workers: int | None = None,
                        output: Path | None = None) -> CheckpointEvaluation:
    """Generate the split's reports with the checkpoint's weights; scores and writes them (JSON)."""
    from r2gen.build import Prepared
    from r2gen.data.loader import build_loader
    from r2gen.evaluate import evaluate

    if split not in SPLITS:
        raise ConfigError(f"--split: unknown {split!r}; choose one of {', '.join(SPLITS)}")
    check_beam_size(beam_size)
    opened = open_checkpoint(checkpoint, ann_path, image_dir)
    state_path, run_dir = opened.state_path, opened.run_dir
    if ann_path is None and run_dir is None:
        raise ConfigError(f"--ann-path: {state_path} has no run directory (config.json) above it; name the data set")
    cfg = opened.inference_config(beam_size, num_workers)
    if ann_path is None:
        facts = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        ann_path, image_dir = Path(facts["annotation"]), image_dir or Path(facts["image_dir"])
    backend = inference_backend(device, precision)
    annotation = opened.annotation or load_annotation(ann_path, image_dir, cfg.model.dataset, progress=True)
    model = opened.model().to(backend.device)
    prep = Prepared(cfg, backend, annotation, opened.tokenizer, model, f"checkpoint {state_path}")
    began = time.perf_counter()
    scores, records, speed = evaluate(model, build_loader(prep, split, train=False), backend, opened.tokenizer, cfg)
    result = CheckpointEvaluation(state_path, split, cfg.beam_size, opened.trained.step, scores, speed, records)
    result.output = output or opened.output_path(f"evaluate-{split}", cfg.beam_size, ".json")
    result.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(result.output, {"checkpoint": str(state_path), "split": split, "beam_size": cfg.beam_size,
                               "step": result.step, "scores": scores, "generate_samples_per_s": speed,
                               "seconds": time.perf_counter() - began, "device": str(backend.device),
                               "precision": backend.precision, "reports": records})
    write_labeler_inputs(records, result.output.with_suffix(""))
    return result
