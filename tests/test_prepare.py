"""`data prepare`: the images rewritten at training resolution give the original set's tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.data.datasets import ReportDataset, build_transform, load_annotation
from r2gen.data.prepare import prepared_image_size
from r2gen.data.tokenizer import Tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def prepared(small_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "set"
    result = runner.invoke(app, ["data", "prepare", "--ann-path", str(small_set), "--out", str(out),
                                 "--image-size", "48", "--workers", "2"])
    assert result.exit_code == 0, result.output
    return out / "annotation.json"


@pytest.mark.parametrize("uint8", [False, True])
def test_prepared_images_give_the_original_tensors(small_set: Path, prepared: Path, uint8: bool) -> None:
    original, new = load_annotation(small_set), load_annotation(prepared)
    tokenizer = Tokenizer.from_reports("iu_xray", (s.report for s in original.splits["train"]), 1)
    for split in ("train", "val", "test"):
        assert [s.id for s in new.splits[split]] == [s.id for s in original.splits[split]]
        assert [s.report for s in new.splits[split]] == [s.report for s in original.splits[split]]
        transform = build_transform(48, split == "train")
        a = ReportDataset(original.splits[split], tokenizer, 60, transform, uint8=uint8)
        b = ReportDataset(new.splits[split], tokenizer, 60, transform, uint8=uint8)
        for i in range(len(a)):
            assert torch.equal(a[(i, i)][1], b[(i, i)][1]), (split, i)  # the same crop and flip draws


def test_prepared_set_records_its_resolution_and_is_smaller(small_set: Path, prepared: Path) -> None:
    facts = json.loads((prepared.parent / "prepared.json").read_text())
    assert facts["image_size"] == 48 and facts["train_shorter_side"] == 55 and facts["images"] == 60
    assert prepared_image_size(prepared) == 48 and prepared_image_size(small_set) is None
    from PIL import Image

    study = load_annotation(prepared).splits["val"][0]
    with Image.open(study.images[0]) as im:
        assert im.size == (48, 48) and im.mode == "L"


def test_bad_requests_write_nothing(small_set: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_set.parent, broken)
    victim = load_annotation(broken / "annotation.json").splits["test"][2].images[1]
    victim.write_bytes(b"not a png")
    cases = [
        (["--ann-path", str(broken / "annotation.json"), "--out", str(tmp_path / "a")], f"cannot read image {victim}"),
        (["--ann-path", str(tmp_path / "missing.json"), "--out", str(tmp_path / "b")], "does not exist"),
        (["--ann-path", str(small_set), "--out", str(broken)], "--out"),
        (["--ann-path", str(small_set), "--out", str(tmp_path / "c"), "--image-size", "8"], "--image-size"),
        (["--ann-path", str(small_set), "--out", str(tmp_path / "d"), "--workers", "0"], "--workers"),
        (["--ann-path", str(small_set), "--out", str(tmp_path / "e"), "--dataset", "chexpert"], "--dataset"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["data", "prepare", *args, "--workers", "2"] if "--workers" not in args
                               else ["data", "prepare", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output folder, no partial sibling


def test_images_much_larger_than_training_uses_get_a_hint(small_set: Path) -> None:
    from r2gen.data.prepare import preparation_hint

    # The small set's images are 64 px: large for --image-size 16 (resize 18), not for 48 (resize 55).
    hint = preparation_hint(load_annotation(small_set), 16)
    assert hint is not None and "data prepare" in hint and "64 px" in hint
    assert preparation_hint(load_annotation(small_set), 48) is None
