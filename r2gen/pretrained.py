"""A trained model from a checkpoint file: this code's or the published R2Gen's.

Ours (any engine's resumable state, best.pt) carry the run's configuration and vocabulary. The
published code's trainer (zhjohnchan/R2Gen modules/trainer.py `_save_checkpoint`) saves
{'state_dict', 'optimizer', 'epoch', 'monitor_best'}: weights with our parameter names, nothing else.
For those:
- the model's shape is read from the weights (backbone, d_model, d_ff, layers, memory slots); the head
  counts and dropouts, which no shape shows, are the published defaults (ModelConfig's);
- the vocabulary is rebuilt from the data set it was trained on by R2Gen's rule (the kind's cleaning
  and threshold, tokenizer.THRESHOLDS: 3 for IU X-Ray, 10 for MIMIC-CXR) and must give the logit
  layer's size;
- the kind changes no shape (an IU X-Ray and a MIMIC-CXR model differ only in their vocabulary's size),
  so it is the annotation's (datasets.annotation_dataset: one image per study is MIMIC-CXR).
Every file is read weights-only (checkpoint.load_checkpoint): the published optimizer state is
tensors and numbers, its monitor_best a float or a numpy scalar; nothing in a file runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r2gen.checkpoint import UnreadableCheckpoint, load_checkpoint
from r2gen.config import TrainConfig
from r2gen.data.datasets import Annotation
from r2gen.data.tokenizer import THRESHOLDS, Tokenizer
from r2gen.errors import ConfigError
from r2gen.model.r2gen import ModelConfig, R2GenModel

LOGIT = "encoder_decoder.logit.weight"
_LAYER3 = "visual_extractor.model.6."  # the ResNet trunk's layer3: its block count tells the depth
_RESNETS = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50", (23, True): "resnet101"}
"""(blocks in layer3, bottleneck blocks) -> torchvision ResNet."""


@dataclass(frozen=True)
class Trained:
    """What a checkpoint gives a model: weights, shape, vocabulary (ours: the run's whole configuration)."""

    weights: dict[str, torch.Tensor]
    model: ModelConfig
    tokenizer: Tokenizer
    config: TrainConfig | None  # ours: the run's; published: None (the caller's preset fills it)
    step: int
    source: str                 # one line: which file, which format, which step or epoch


def is_ours(state: Any) -> bool:
    return isinstance(state, dict) and {"model", "config", "tokenizer"} <= state.keys()


def is_published(state: Any) -> bool:
    return isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and not is_ours(state)


def read_checkpoint(path: Path, flag: str) -> dict:
    """A checkpoint of either format, read weights-only; anything else is one ConfigError line."""
    try:
        state = load_checkpoint(path)
    except UnreadableCheckpoint as exc:  # truncated, foreign, not a torch file at all, or code in it
        raise ConfigError(f"{flag}: {exc}") from None
    if not (is_ours(state) or is_published(state)):
        raise ConfigError(f"{flag}: {path} is neither an r2gen-launch checkpoint (model, config and vocabulary) "
                          "nor a published R2Gen one (state_dict)")
    return state


def ours(state: dict, path: Path) -> Trained:
    cfg = TrainConfig.from_dict(state["config"])
    step = int(state.get("step", 0))
    return Trained(state["model"], cfg.model, Tokenizer.from_json(state["tokenizer"]), cfg, step,
                   f"r2gen-launch checkpoint {path} (step {step})")


def published(state: dict, path: Path, flag: str, annotation: Annotation, max_seq_length: int) -> Trained:
    """A published file's model: shape from its weights, vocabulary rebuilt from `annotation` (the data
    set it was trained on; its kind decides cleaning and threshold) and checked against the logit layer."""
    weights = {str(k).removeprefix("module."): v for k, v in state["state_dict"].items()}  # DataParallel's prefix
    model = shape_config(weights, path, flag, ModelConfig(dataset=annotation.dataset, max_seq_length=max_seq_length))
    tokenizer = Tokenizer.from_reports(annotation.dataset, (s.report for s in annotation.splits["train"]))
    words = weights[LOGIT].shape[0] - 1  # the logit layer's rows: the words and id 0 (end, padding)
    if len(tokenizer) != words:
        raise ConfigError(f"--ann-path: the vocabulary R2Gen's rule builds from {annotation.path} "
                          f"({annotation.dataset}: train words seen {THRESHOLDS[annotation.dataset]}+ times) has "
                          f"{len(tokenizer)} words, "
                          f"{path}'s logit layer {words}: name the data set it was trained on")
    epoch = state.get("epoch")
    return Trained(weights, model, tokenizer, None, 0, f"published R2Gen checkpoint {path} (epoch {epoch})")


def shape_config(weights: dict[str, Any], path: Path, flag: str, base: ModelConfig) -> ModelConfig:
    """`base` with the sizes the weights show: backbone, d_model (= rm_d_model), d_ff, layers, memory slots."""
    try:
        d_model = weights[LOGIT].shape[1]
        blocks = {k[len(_LAYER3):].split(".")[0] for k in weights if k.startswith(_LAYER3)}
        backbone = _RESNETS[(len(blocks), f"{_LAYER3}0.conv3.weight" in weights)]
        layers = {k.split(".")[4] for k in weights if k.startswith("encoder_decoder.model.encoder.layers.")}
        d_ff = weights["encoder_decoder.model.encoder.layers.0.feed_forward.w_1.weight"].shape[0]
        slots = weights["encoder_decoder.model.decoder.layers.0.sublayer.0.norm.mlp_gamma.0.weight"].shape[1] // d_model
        return dataclasses.replace(base, backbone=backbone, d_model=d_model, rm_d_model=d_model, d_ff=d_ff,
                                   num_layers=len(layers), rm_num_slots=slots)
    except (KeyError, AttributeError, IndexError, ValueError) as exc:
        raise ConfigError(f"{flag}: {path} holds no R2Gen model's weights ({type(exc).__name__}: {exc})") from None


def load_weights(model: R2GenModel, trained: Trained, flag: str) -> None:
    try:
        model.load_state_dict(trained.weights)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()  # the first only says "Error(s) in loading state_dict"
        raise ConfigError(f"{flag}: the weights of {trained.source} do not fit its model: "
                          f"{lines[min(1, len(lines) - 1)].strip()}") from None


def fine_tune_start(path: Path, cfg: TrainConfig, annotation: Annotation) -> Trained:
    """--init-from: the model a new run starts from. Its shape and vocabulary are the checkpoint's (a
    published file's rebuilt from the run's annotation); the views and report length are the run's."""
    state = read_checkpoint(path, "--init-from")
    if is_published(state):
        return published(state, path, "--init-from", annotation, cfg.model.max_seq_length)
    trained = ours(state, path)
    model = dataclasses.replace(trained.model, dataset=cfg.model.dataset, max_seq_length=cfg.model.max_seq_length)
    return dataclasses.replace(trained, model=model)
