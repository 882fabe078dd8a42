"""The uint8 input pipeline: loaders hand uint8 images (one channel for grayscale) to the device,
which converts and normalizes them; the model sees bit for bit what R2Gen's host transforms give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r2gen.data.datasets import (ReportDataset, Study, build_transform, collate, images_to_device,
                                 load_annotation)
from r2gen.data.tokenizer import Tokenizer


def _studies(tmp_path: Path) -> list[Study]:
    """Grayscale 8-bit and 16-bit PNGs, a colour JPEG and a non-square image, two views each."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, size) in enumerate([("L", (80, 80)), ("I;16", (70, 90)), ("RGB", (64, 80)), ("L", (100, 60))]):
        if mode == "L":
            image = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8))
        elif mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
        else:
            image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
        path = tmp_path / f"{i}.{'jpg' if mode == 'RGB' else 'png'}"
        image.save(path)
        paths.append(path)
    return [Study(str(i), "a b c .", (paths[i], paths[(i + 1) % 4])) for i in range(4)]


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_uint8_items_normalized_on_the_device_equal_the_host_transforms(tmp_path: Path, train: bool,
                                                                         cache: bool) -> None:
    studies = _studies(tmp_path)
    tokenizer = Tokenizer.from_reports("iu_xray", ["a b c ."] * 4, 1)
    host = ReportDataset(studies, tokenizer, 60, build_transform(48, train))
    fast = ReportDataset(studies, tokenizer, 60, build_transform(48, train), cache=cache, uint8=True)
    for i in range(len(studies)):
        a, b = host[(i, 100 + i)], fast[(i, 100 + i)]  # (index, seed): the same random crop and flip
        assert b[1].dtype == torch.uint8 and b[1].shape[1] in (1, 3)
        assert a[0] == b[0] and a[2] == b[2]
        assert torch.equal(images_to_device(b[1].unsqueeze(0), torch.device("cpu"))[0], a[1])
    # Batched, with mixed channel counts, as the loader collates them.
    reference = collate([host[(i, i)] for i in range(4)])["images"]
    batch = collate([fast[(i, i)] for i in range(4)])["images"]
    assert batch.dtype == torch.uint8 and batch.nbytes * 4 <= reference.nbytes  # fewer bytes per batch
    assert torch.equal(images_to_device(batch, torch.device("cpu")), reference)


def test_grayscale_sets_travel_as_one_channel(small_set: Path) -> None:
    annotation = load_annotation(small_set)
    tokenizer = Tokenizer.from_reports("iu_xray", (s.report for s in annotation.splits["train"]), 1)
    dataset = ReportDataset(annotation.splits["train"][:2], tokenizer, 60, build_transform(32, True), uint8=True)
    batch = collate([dataset[0], dataset[1]])["images"]
    assert batch.shape == (2, 2, 1, 32, 32) and batch.dtype == torch.uint8  # 12x fewer bytes than fp32 RGB


def test_float_batches_pass_through_unchanged() -> None:
    images = torch.randn(2, 2, 3, 8, 8)
    assert images_to_device(images, torch.device("cpu")) is images
