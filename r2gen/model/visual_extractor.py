"""The visual extractor: a torchvision ResNet without its last two children (avgpool, fc).

Gives patch features (B, H'*W', C) and average-pooled features (B, C), as R2Gen does. R2Gen pools
with AvgPool2d(7) on a 7x7 map (224 px input); an adaptive average pool is the same there and
also works for the smaller images of the tiny preset.

Also the one home of a ResNet weights file: reading it weights-only (`read_state_dict`), checking it
key by key and shape by shape (`resnet_mismatch`), and where torchvision's cache keeps ImageNet's
(`imagenet_cache_path`).
"""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn as nn
import torchvision

from r2gen.errors import ConfigError

BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
"""Supported backbones and the channel count of their last feature map (R2Gen's d_vf)."""


def smallest_micro_batch(image_size: int) -> int:
    """The fewest studies a training micro-batch may hold: 2 where the ResNet's last feature map is
    1x1 (images of 32 px or less, as the tiny preset's), since BatchNorm in training needs more than
    one value per channel; 1 otherwise."""
    return 2 if image_size <= 32 else 1


class WeightsError(ConfigError):
    """A weights file that cannot be used (--visual-weights, `weights import`); the message names it."""


class VisualExtractor(nn.Module):
    def __init__(self, backbone: str = "resnet101"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.backbone = backbone
        resnet = getattr(torchvision.models, backbone)(weights=None)
        self.model = nn.Sequential(*list(resnet.children())[:-2])
        self.trunk_names = [name for name, _ in resnet.named_children()][:-2]  # self.model's 0, 1, ... by name

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch_feats = self.model(images)
        batch_size, feat_size = patch_feats.shape[:2]
        avg_feats = patch_feats.mean(dim=(2, 3)).reshape(batch_size, feat_size)
        patch_feats = patch_feats.reshape(batch_size, feat_size, -1).permute(0, 2, 1)
        return patch_feats, avg_feats

    def load_resnet_state_dict(self, state_dict: dict[str, Any], source: str) -> None:
        """Load a torchvision ResNet state_dict (its fc, if any, is ignored), checked by `resnet_mismatch`."""
        problem = resnet_mismatch(state_dict, self.backbone)
        if problem is not None:
            raise WeightsError(f"{source}: not a torchvision {self.backbone} state_dict: {problem}")
        index = {name: str(i) for i, name in enumerate(self.trunk_names)}
        trunk = {}
        for key, value in state_dict.items():
            child, _, rest = key.partition(".")
            if child in index:
                trunk[f"{index[child]}.{rest}"] = value
        self.model.load_state_dict(trunk)  # strict; BatchNorm fills a missing num_batches_tracked


OPTIONAL_SUFFIX = ".num_batches_tracked"
"""BatchNorm's counter: absent from files saved before PyTorch 0.4 (torchvision's older ImageNet files among
them); loading fills it in."""


@functools.cache
def resnet_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's `backbone` state_dict, fc included, with its shape (built on the meta
    device: no memory, no initialization). Shared: read it, never change it."""
    with torch.device("meta"):
        resnet = getattr(torchvision.models, backbone)(weights=None)
    return {key: tuple(value.shape) for key, value in resnet.state_dict().items()}


def resnet_mismatch(state_dict: dict[str, Any], backbone: str, head: bool = False) -> str | None:
    """The first way `state_dict` differs from torchvision's `backbone`, in words (a missing key, an
    unexpected key, a value of the wrong shape), or None. fc.weight/fc.bias are ignored (R2Gen drops
    the classifier) unless `head`: then they must be there with ImageNet's shapes."""
    expected = {k: shape for k, shape in resnet_shapes(backbone).items() if head or not k.startswith("fc.")}
    given = {k: v for k, v in state_dict.items() if head or not k.startswith("fc.")}
    missing = [k for k in expected if k not in given and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in given if k not in expected]
    for what, keys in (("missing", missing), ("unexpected key", unexpected)):
        if keys:
            return f"{what} {keys[0]}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
    for key, shape in expected.items():
        value = given.get(key)
        if key in given and not isinstance(value, torch.Tensor):
            return f"{key} holds a {type(value).__name__}, not a tensor"
        if key in given and tuple(value.shape) != shape:
            return f"{key} has shape {_shape(tuple(value.shape))}, {backbone}'s is {_shape(shape)}"
    return None


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def read_state_dict(file: Path | BinaryIO, label: str) -> dict[str, Any]:
    """The state_dict in a torch file (`load_weights_only`, then `as_state_dict`)."""
    return as_state_dict(load_weights_only(file, label), label)


def load_weights_only(file: Path | BinaryIO, label: str) -> Any:
    """What a torch file holds, read weights-only: a file from elsewhere never runs code. Errors are one
    WeightsError line starting with `label`."""
    try:
        with warnings.catch_warnings():  # torch's own notes on the file's pickle protocol: the error says it
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{label}: cannot be read weights-only (so that a file from elsewhere never runs "
                           f"code): {_weights_only_reason(str(err))}") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        detail = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else "empty or cut short"
        raise WeightsError(f"{label}: not a torch file, or a truncated one ({type(err).__name__}: {detail})") from None


def as_state_dict(held: Any, label: str) -> dict[str, Any]:
    """A bare state_dict, or the one under "state_dict" or "model"; DataParallel's "module." prefixes removed."""
    for wrapper in ("state_dict", "model"):
        if isinstance(held, dict) and isinstance(held.get(wrapper), dict):
            held = held[wrapper]
            break
    if not isinstance(held, dict):
        raise WeightsError(f"{label}: holds a {type(held).__name__}, not a state_dict")
    return {str(k).removeprefix("module."): v for k, v in held.items()}


def _weights_only_reason(message: str) -> str:
    """The line of torch's weights-only refusal that says what it met (the rest is the same advice each time)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boiler)]
    return (reasons or lines or ["unreadable"])[0]


IMAGENET_URL_VARIABLE = "R2GEN_IMAGENET_URL"
"""Where to download the run's backbone's ImageNet weights instead of torchvision's host (a mirror); the
file's name keeps torchvision's `<name>-<first hex digits of its sha256>.pth` form, which is checked."""

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for the weights' host to answer (a machine without network fails fast)."""

VISUAL_WEIGHTS_CHOICES = ("random", "imagenet")
"""--visual-weights' words; anything else is a file."""


def imagenet_url(backbone: str) -> str:
    """The ImageNet weights' URL: $R2GEN_IMAGENET_URL, else torchvision's own for `backbone`."""
    return os.environ.get(IMAGENET_URL_VARIABLE) or torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url


def imagenet_cache_path(backbone: str) -> Path:
    """Where torchvision keeps, and looks for, `backbone`'s ImageNet weights: torch.hub's checkpoints
    folder, under the last part of the weights' url."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_url(backbone).rsplit("/", 1)[-1]


def _cached_torchvision_weights(backbone: str) -> Path | None:
    """The ImageNet weights file torchvision would download, if it is already in the local cache."""
    path = imagenet_cache_path(backbone)
    return path if path.is_file() else None


def download_imagenet(backbone: str) -> Path:
    """Download `backbone`'s ImageNet weights into torchvision's cache as torchvision does (torch.hub: a
    temporary file, checked against the sha256 prefix in its name, then moved in place; a progress bar
    on a terminal). A host that does not answer within CONNECT_TIMEOUT_S, or a file that fails the
    check (removed), is a WeightsError naming the ways on."""
    import socket
    import sys
    import urllib.error

    url = imagenet_url(backbone)
    target = imagenet_cache_path(backbone)
    match = torch.hub.HASH_REGEX.search(target.name)
    ways_on = ("copy the file from a machine with internet and run `r2gen-launch weights import FILE`, or train "
               "from scratch on purpose with --visual-weights random")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not sys.stderr.isatty():
        print(f"downloading {backbone} ImageNet weights from {url} to {target}", file=sys.stderr, flush=True)
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CONNECT_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(target), match.group(1) if match else None,
                                       progress=sys.stderr.isatty())
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(f"--visual-weights imagenet: {url} could not be reached ({reason}); {ways_on}") from None
    except RuntimeError as err:  # torch.hub's hash check; its temporary file is gone
        raise WeightsError(f"--visual-weights imagenet: the file downloaded from {url} failed its sha256 check "
                           f"({err}) and was not kept; {ways_on}") from None
    finally:
        socket.setdefaulttimeout(before)
    return target


def init_visual_weights(extractor: VisualExtractor, weights: Path | None) -> str:
    """Load the visual extractor's starting weights; a one-line description of where they came from.

    `weights`: a file; `random` (on purpose); `imagenet` (torchvision's cache, else downloaded into it:
    the published R2Gen's start); None: torchvision's cached ImageNet file if there, else random with a
    warning, never the network (the embedded set's runs, offline and deterministic)."""
    backbone = extractor.backbone
    spec = str(weights) if weights is not None else None
    if spec == "random":
        return f"{backbone} randomly initialized (--visual-weights random)"
    if spec is not None and spec != "imagenet":
        path = Path(spec)
        if not path.is_file():
            raise WeightsError(f"--visual-weights: no such file: {path} (or use {' or '.join(VISUAL_WEIGHTS_CHOICES)})")
        extractor.load_resnet_state_dict(read_state_dict(path, f"--visual-weights {path}"), f"--visual-weights {path}")
        return f"{backbone} weights from {path}"
    cached, how = _cached_torchvision_weights(backbone), " from the torchvision cache"
    if cached is None and spec == "imagenet":
        cached, how = download_imagenet(backbone), ", downloaded into the torchvision cache"
    if cached is not None:
        extractor.load_resnet_state_dict(read_state_dict(cached, str(cached)), str(cached))
        return f"{backbone} ImageNet weights{how} ({cached})"
    warnings.warn(
        f"no pretrained {backbone} weights found (no --visual-weights, nothing in the torchvision "
        f"cache {torch.hub.get_dir()}/checkpoints): the visual extractor starts from random initialization",
        stacklevel=2,
    )
    return f"{backbone} randomly initialized (no pretrained weights available offline)"


