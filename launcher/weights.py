"""`r2gen-launch weights import`: a torchvision ResNet state_dict, checked key by key and shape by shape,
put where torchvision's cache looks for ImageNet weights (`imagenet_cache_path`), so that runs start
from them offline, without --visual-weights.

The cache is shared with every program that asks torchvision for these weights, so what goes there is
what torchvision's own loader reads: the whole ImageNet model, its 1000-class fc included (a backbone
alone works with --visual-weights). A bare state_dict is copied byte for byte; one under "state_dict" or
"model", or with DataParallel's "module." prefixes, is saved bare. Other weights already there are
replaced only with --force; the same weights again write nothing.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from r2gen.atomic import write_file
from r2gen.errors import ConfigError
from r2gen.model.visual_extractor import (BACKBONES, OPTIONAL_SUFFIX, WeightsError, as_state_dict,
                                          imagenet_cache_path, load_weights_only, read_state_dict,
                                          resnet_mismatch, resnet_shapes)


@dataclass(frozen=True)
class Imported:
    backbone: str
    path: Path        # in torchvision's cache
    written: bool     # False: it held these weights already
    sha256: str       # of the file in the cache
    published: bool   # the sha256 starts with the hash in torchvision's file name: its own download


def _trunk_keys(keys: Iterable[str]) -> set[str]:
    """The keys that tell the backbones apart: fc and BatchNorm's optional counter aside."""
    return {k for k in keys if not k.startswith("fc.") and not k.endswith(OPTIONAL_SUFFIX)}


def check_imagenet_resnet(state: dict[str, Any], backbone: str | None, label: str) -> str:
    """The backbone whose whole ImageNet model `state` is: `backbone`, else the one whose keys it has
    (the nearest, for the message, where none matches). A WeightsError starting with `label` otherwise."""
    keys = _trunk_keys(state)
    candidates = {name: _trunk_keys(resnet_shapes(name)) for name in BACKBONES}
    if not any(keys & trunk for trunk in candidates.values()):
        raise WeightsError(f"{label}: not a torchvision ResNet state_dict (it has none of the keys of "
                           f"{', '.join(BACKBONES)}, such as conv1.weight)")
    if backbone is None:
        backbone = min(candidates, key=lambda name: len(keys ^ candidates[name]))
    problem = resnet_mismatch(state, backbone, head=True)
    if problem is not None:
        hint = "" if resnet_mismatch(state, backbone) is not None else (
            " (torchvision's cache holds the whole ImageNet model, its 1000-class fc included; for a backbone "
            "alone use --visual-weights)")
        raise WeightsError(f"{label}: not a torchvision {backbone} ImageNet state_dict: {problem}{hint}")
    return backbone


def import_weights(file: Path, backbone: str | None, force: bool) -> Imported:
    """Check `file` and put it in torchvision's cache (atomically); nothing is written on any refusal."""
    if backbone is not None and backbone not in BACKBONES:
        raise ConfigError(f"--backbone: unknown {backbone!r}; choose one of {', '.join(BACKBONES)}")
    label = str(file)
    try:
        data = file.read_bytes()  # the bytes checked are the bytes copied
    except OSError as err:
        raise WeightsError(f"{label}: cannot read it ({err.strerror or err})") from None
    held = load_weights_only(io.BytesIO(data), label)
    state = as_state_dict(held, label)
    backbone = check_imagenet_resnet(state, backbone, label)
    if not (isinstance(held, dict) and list(held) == list(state)):  # wrapped or prefixed: saved bare
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    target = imagenet_cache_path(backbone)
    written = not (target.exists() and _holds(target, state))
    if written and target.exists() and not force:
        raise ConfigError(f"{label}: torchvision's cache holds other {backbone} weights at {target}; "
                          "--force replaces them")
    if written:
        try:
            write_file(target, lambda f: f.write(data))
        except OSError as err:
            raise ConfigError(f"{label}: cannot write {target} ({err.strerror or err})") from None
    else:
        data = target.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    name_hash = torch.hub.HASH_REGEX.search(target.name)
    return Imported(backbone, target, written, sha256, bool(name_hash) and sha256.startswith(name_hash.group(1)))


def _holds(path: Path, state: dict[str, Any]) -> bool:
    """Whether the file at `path` holds the same tensors as `state` (BatchNorm's optional counter aside)."""
    try:
        there = read_state_dict(path, str(path))
    except WeightsError:
        return False
    ours = {k: v for k, v in state.items() if not k.endswith(OPTIONAL_SUFFIX)}
    theirs = {k: v for k, v in there.items() if not k.endswith(OPTIONAL_SUFFIX)}
    return ours.keys() == theirs.keys() and all(
        isinstance(theirs[k], torch.Tensor) and theirs[k].dtype == v.dtype and theirs[k].shape == v.shape
        and torch.equal(theirs[k], v) for k, v in ours.items())
