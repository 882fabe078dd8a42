"""The visual extractor: a torchvision ResNet without its last two children (avgpool, fc).

Gives patch features (B, H'*W', C) and average-pooled features (B, C), as R2Gen does. R2Gen pools
with AvgPool2d(7) on a 7x7 map (224 px input); an adaptive average pool is the same there and
also works for the smaller images of the tiny preset.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from r2gen.errors import UsageError

BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
"""Supported backbones and the channel count of their last feature map (R2Gen's d_vf)."""


def smallest_micro_batch(image_size: int) -> int:
    """The fewest studies a training micro-batch may hold: 2 where the ResNet's last feature map is
    1x1 (images of 32 px or less, as the tiny preset's), since BatchNorm in training needs more than
    one value per channel; 1 otherwise."""
    return 2 if image_size <= 32 else 1


class WeightsError(UsageError):
    """A --visual-weights file that cannot be used."""


class VisualExtractor(nn.Module):
    def __init__(self, backbone: str = "resnet101"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.backbone = backbone
        resnet = getattr(torchvision.models, backbone)(weights=None)
        self.model = nn.Sequential(*list(resnet.children())[:-2])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patch_feats = self.model(images)
        batch_size, feat_size = patch_feats.shape[:2]
        avg_feats = patch_feats.mean(dim=(2, 3)).reshape(batch_size, feat_size)
        patch_feats = patch_feats.reshape(batch_size, feat_size, -1).permute(0, 2, 1)
        return patch_feats, avg_feats

    def load_resnet_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a torchvision ResNet state_dict (its fc weights are ignored)."""
        resnet = getattr(torchvision.models, self.backbone)(weights=None)
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        try:
            resnet.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise WeightsError(f"{source}: not a torchvision {self.backbone} state_dict ({first})") from None
        self.model.load_state_dict(nn.Sequential(*list(resnet.children())[:-2]).state_dict())


def _cached_torchvision_weights(backbone: str) -> Path | None:
    """The ImageNet weights file torchvision would download, if it is already in the local cache."""
    enum = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
    file_name = enum.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    return path if path.is_file() else None


def init_visual_weights(extractor: VisualExtractor, weights_path: Path | None) -> str:
    """Load pretrained weights: the given file, else torchvision's cached ImageNet file, else random.

    Returns a one-line description of where the weights came from. Never touches the network.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsError(f"--visual-weights: no such file: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            raise WeightsError(f"--visual-weights: cannot read {path}: {err}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsError(f"--visual-weights: {path} does not hold a state_dict")
        extractor.load_resnet_state_dict(state, str(path))
        return f"{extractor.backbone} weights from {path}"
    cached = _cached_torchvision_weights(extractor.backbone)
    if cached is not None:
        extractor.load_resnet_state_dict(torch.load(cached, map_location="cpu", weights_only=True), str(cached))
        return f"{extractor.backbone} ImageNet weights from the torchvision cache ({cached})"
    warnings.warn(
        f"no pretrained {extractor.backbone} weights found (no --visual-weights, nothing in the torchvision "
        f"cache {torch.hub.get_dir()}/checkpoints): the visual extractor starts from random initialization",
        stacklevel=2,
    )
    return f"{extractor.backbone} randomly initialized (no pretrained weights available offline)"
