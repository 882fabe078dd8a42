"""A run's pieces, validated and built before anything is written: tokenizer, model, weights, optimizer.

`prepare` is what the launcher calls first (bad input raises a UsageError: exit 2, nothing written);
`prepare_model` hands the model to the engine (device, wrapping, the optimizer of `build_optimizer`:
R2Gen's Adam with two parameter groups) and applies the GPU speed-ups the engine allows.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r2gen.config import TrainConfig
from r2gen.data.datasets import Annotation
from r2gen.data.tokenizer import Tokenizer
from r2gen.engine import OptimizerFactory, TrainingEngine
from r2gen.errors import ConfigError
from r2gen.model.r2gen import R2GenModel
from r2gen.model.visual_extractor import init_visual_weights
from r2gen.pretrained import fine_tune_start, load_weights
from r2gen.speedups import speed_up


@dataclass
class Prepared:
    """Everything validated and built, before anything is written."""

    cfg: TrainConfig
    backend: TrainingEngine
    annotation: Annotation
    tokenizer: Tokenizer
    model: R2GenModel
    weights_source: str
    init_from: Path | None = None  # the checkpoint a fine-tune's weights came from (--init-from)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: TrainConfig, backend: TrainingEngine, annotation: Annotation, visual_weights: Path | None,
            init_from: Path | None = None, tokenizer: Tokenizer | None = None) -> Prepared:
    """Build tokenizer and model and load weights; raises UsageError subclasses on bad input.

    `init_from` (a fine-tune): every weight, the model's shape and the vocabulary from that checkpoint
    (r2gen.pretrained). `tokenizer`: the vocabulary the launcher decided (a continued or multi-process
    run's), else built from the train split."""
    seed_everything(cfg.seed)
    start = None
    if init_from is not None:
        if visual_weights is not None:
            raise ConfigError("--visual-weights: --init-from gives every weight, the visual extractor's too; "
                              "drop one of them")
        start = fine_tune_start(init_from, cfg, annotation)
        cfg = dataclasses.replace(cfg, model=start.model)
    tokenizer = tokenizer or (start.tokenizer if start else Tokenizer.from_reports(
        annotation.dataset, (s.report for s in annotation.splits["train"]), cfg.threshold))
    model = R2GenModel(cfg.model, len(tokenizer))
    if start is None:
        return Prepared(cfg, backend, annotation, tokenizer, model,
                        init_visual_weights(model.visual_extractor, visual_weights))
    load_weights(model, start, "--init-from")
    return Prepared(cfg, backend, annotation, tokenizer, model, f"every weight from {start.source}", init_from)


def build_optimizer(model: R2GenModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    ve_params = list(model.visual_extractor.parameters())
    ve_ids = {id(p) for p in ve_params}
    ed_params = [p for p in model.parameters() if id(p) not in ve_ids]
    # The fused update (one kernel, the same arithmetic) where every parameter is on one kind of device
    # that has it: a GPU, or the CPU (there 4.7x faster than the per-tensor loop for the tiny preset).
    # Every adapter calls this after moving the model to where it trains.
    fused = cfg.fused_optimizer and {p.device.type for p in model.parameters()} in ({"cuda"}, {"cpu"}) or None
    return torch.optim.Adam([{"params": ve_params, "lr": cfg.lr_ve}, {"params": ed_params, "lr": cfg.lr_ed}],
                            weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, fused=fused)


def optimizer_factory(cfg: TrainConfig) -> OptimizerFactory:
    """build_optimizer for this configuration, called by the backend adapter's prepare()."""
    return lambda model: build_optimizer(model, cfg)


def prepare_model(backend: TrainingEngine, model: R2GenModel, cfg: TrainConfig):
    """The backend's prepare (device, wrapping, optimizer) and then the GPU speed-ups this backend allows
    (r2gen.speedups): (model as the backend wraps it, optimizer)."""
    model, optimizer = backend.prepare(model, optimizer_factory(cfg))
    speed_up(backend.unwrap(model), backend, cfg)
    return model, optimizer
