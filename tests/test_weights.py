"""`r2gen-launch weights import`: real torchvision ResNet state_dicts, checked and put where torchvision's
cache looks (a TORCH_HOME of the test's own); refusals are one line, exit 2, and leave the cache empty;
`env` says what the cache holds."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.model.visual_extractor import (VisualExtractor, _cached_torchvision_weights, imagenet_cache_path,
                                          init_visual_weights)

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("torch_home")  # torchvision's cache of each test's own (conftest)


@pytest.fixture(scope="module")
def resnet18() -> dict[str, torch.Tensor]:
    """A whole torchvision resnet18 (fc included), as its ImageNet file holds one; random weights."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _import(*args: str):
    return runner.invoke(app, ["weights", "import", *args])


def _cache_files(torch_home: Path) -> list[Path]:
    folder = torch_home / "hub" / "checkpoints"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_torchvision_file_is_copied_byte_for_byte_and_runs_start_from_it(
        tmp_path: Path, torch_home: Path, resnet18: dict) -> None:
    file = _save(resnet18, tmp_path / "resnet18.pth")
    result = _import(str(file))
    assert result.exit_code == 0, result.output
    cached = _cached_torchvision_weights("resnet18")
    assert cached is not None and cached.read_bytes() == file.read_bytes()
    assert f"wrote {cached}" in result.output and "not torchvision's published file" in result.output

    extractor = VisualExtractor("resnet18")
    assert "from the torchvision cache" in init_visual_weights(extractor, None)
    trunk = extractor.model.state_dict()
    for i, name in enumerate(extractor.trunk_names):
        for key, value in resnet18.items():
            if key.startswith(f"{name}."):
                assert torch.equal(trunk[f"{i}.{key.removeprefix(name + '.')}"], value), key
    assert torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()["fc.bias"].equal(resnet18["fc.bias"])

    again = _import(str(file))  # the same weights again: nothing to do
    assert again.exit_code == 0 and "already there (nothing written)" in again.output, again.output


def test_a_wrapped_file_without_batchnorm_counters_is_saved_bare(
        tmp_path: Path, torch_home: Path, resnet18: dict) -> None:
    # A checkpoint of DataParallel training; and like torchvision's 2017 files, no num_batches_tracked.
    inner = {f"module.{k}": v for k, v in resnet18.items() if not k.endswith("num_batches_tracked")}
    file = _save({"state_dict": inner, "epoch": 90}, tmp_path / "checkpoint.pth.tar")
    result = _import(str(file), "--backbone", "resnet18")
    assert result.exit_code == 0, result.output
    cached = imagenet_cache_path("resnet18")
    # torchvision's own loader reads what was written, from the cache (no network here).
    loaded = torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict()
    assert cached.is_file() and all(torch.equal(loaded[k], v) for k, v in resnet18.items()
                                    if not k.endswith("num_batches_tracked"))
    extractor = VisualExtractor("resnet18")  # and so does ours, BatchNorm's counters filled in
    assert "from the torchvision cache" in init_visual_weights(extractor, None)
    assert torch.equal(extractor.model[7][1].bn2.running_var, resnet18["layer4.1.bn2.running_var"])


def test_other_weights_are_replaced_only_with_force(tmp_path: Path, torch_home: Path, resnet18: dict) -> None:
    first = _save(resnet18, tmp_path / "first.pth")
    second = _save({k: v + 1 if v.is_floating_point() else v for k, v in resnet18.items()}, tmp_path / "second.pth")
    assert _import(str(first)).exit_code == 0
    refused = _import(str(second))
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 2 and len(lines) == 1 and str(second) in lines[0] and "--force" in lines[0]
    assert imagenet_cache_path("resnet18").read_bytes() == first.read_bytes()
    assert _import(str(second), "--force").exit_code == 0
    assert imagenet_cache_path("resnet18").read_bytes() == second.read_bytes()


class _RunsCode:
    """A pickle that would write a file when loaded: reading weights-only must refuse it unrun."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _refusals(tmp_path: Path, resnet18: dict) -> list[tuple[Path, list[str], str]]:
    """(file, extra args, what the line says) for each file `weights import` must refuse."""
    wrong_shape = dict(resnet18, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)})
    truncated = _save(resnet18, tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "a-folder").mkdir()
    return [
        (_save(resnet18, tmp_path / "r18.pth"), ["--backbone", "resnet101"],
         "not a torchvision resnet101 ImageNet state_dict: missing layer1.0.conv3.weight (and "),
        (_save(resnet18, tmp_path / "r18-as-34.pth"), ["--backbone", "resnet34"], "missing layer1.2.conv1.weight"),
        (_save(wrong_shape, tmp_path / "shape.pth"), [],
         "layer2.0.conv1.weight has shape (128, 64, 1, 1), resnet18's is (128, 64, 3, 3)"),
        (_save({k: v for k, v in resnet18.items() if k != "layer4.1.bn2.bias"}, tmp_path / "missing.pth"), [],
         "missing layer4.1.bn2.bias"),
        (_save(dict(resnet18, extra=torch.zeros(1)), tmp_path / "extra.pth"), [], "unexpected key extra"),
        (_save({k: v for k, v in resnet18.items() if not k.startswith("fc.")}, tmp_path / "no-fc.pth"), [],
         "missing fc.weight (and 1 more) (torchvision's cache holds the whole ImageNet model"),
        (_save(torchvision.models.vgg11().features.state_dict(), tmp_path / "vgg.pth"), [],
         "not a torchvision ResNet state_dict"),
        (_save({"weights": _RunsCode(tmp_path / "ran")}, tmp_path / "code.pth"), [], "cannot be read weights-only"),
        (tmp_path / "truncated.pth", [], "not a torch file, or a truncated one"),
        (tmp_path / "absent.pth", [], "cannot read it (No such file or directory)"),
        (tmp_path / "a-folder", [], "cannot read it (Is a directory)"),
    ]


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path: Path, torch_home: Path, resnet18: dict) -> None:
    for file, args, needle in _refusals(tmp_path, resnet18):
        result = _import(str(file), *args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (file, result.output)
        assert len(lines) == 1 and lines[0].startswith(f"error: {file}: ") and needle in lines[0], result.output
        assert _cache_files(torch_home) == [], file
    assert not (tmp_path / "ran").exists()  # the pickle's code never ran
    unknown = _import(str(tmp_path / "r18.pth"), "--backbone", "vgg11")
    assert unknown.exit_code == 2 and "--backbone: unknown 'vgg11'" in unknown.output


def test_a_backbone_alone_still_works_as_visual_weights(tmp_path: Path, resnet18: dict) -> None:
    file = _save({k: v for k, v in resnet18.items() if not k.startswith("fc.")}, tmp_path / "trunk.pth")
    extractor = VisualExtractor("resnet18")
    assert init_visual_weights(extractor, file) == f"resnet18 weights from {file}"
    assert torch.equal(extractor.model[0].weight, resnet18["conv1.weight"])


def test_env_says_whether_the_cache_holds_imagenet_weights(tmp_path: Path, torch_home: Path, resnet18: dict,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich's width: a path in one line of its cell

    def env(shown: str) -> dict:
        result = runner.invoke(app, ["env", "--json", str(tmp_path / "env.json")])
        assert result.exit_code == 0, result.output
        assert "ImageNet weights in torchvision's cache" in result.output and shown in result.output, result.output
        return json.loads((tmp_path / "env.json").read_text())["imagenet_weights"]

    before = env("`r2gen-launch weights import FILE` puts them at")
    assert before["resnet101"] == {"path": str(imagenet_cache_path("resnet101")), "present": False}
    assert before["resnet18"]["present"] is False
    assert _import(str(_save(resnet18, tmp_path / "r18.pth"))).exit_code == 0
    after = env(f"present: {imagenet_cache_path('resnet18')}")
    assert after["resnet18"] == {"path": str(imagenet_cache_path("resnet18")), "present": True}
    assert after["resnet101"]["present"] is False
