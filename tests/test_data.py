"""Up-front validation of annotation files and images: every bad input is one clear DataError
(naming the file and the study), exit code 2 from the CLI, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.data.datasets import ReportDataset, build_transform, collate, load_annotation
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import DataError


def _write_set(root: Path, views: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    data: dict[str, list] = {}
    for split in ("train", "val", "test"):
        data[split] = []
        for i in range(2):
            sid = f"{split}{i}"
            paths = []
            for v in range(views):
                rel = f"{sid}/{v}.png"
                (root / "images" / sid).mkdir(exist_ok=True)
                Image.new("L", (40, 40), color=30 * v + i).save(root / "images" / rel)
                paths.append(rel)
            data[split].append({"id": sid, "report": "The heart is normal. No effusion.",
                                "image_path": paths, "split": split})
    path = root / "annotation.json"
    path.write_text(json.dumps(data))
    return path


def _edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))
    return apply


def _write_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def _corrupt_image(path: Path) -> None:
    (path.parent / "images" / "val1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


BAD_CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("missing file", lambda p: p.unlink(), ["annotation.json", "does not exist"]),
    ("not JSON", _write_text("{'train': ["), ["annotation.json", "not valid JSON", "line 1"]),
    ("not UTF-8", lambda p: p.write_bytes(b"\xff\xfe{}"), ["annotation.json", "not UTF-8"]),
    ("top level a list", _write_text("[]"), ["annotation.json", "'train', 'val' and 'test'"]),
    ("missing split", _edit(lambda d: d.pop("val")), ["annotation.json", "missing split 'val'"]),
    ("split not a list", _edit(lambda d: d.update(test={})), ["split 'test' must be a list"]),
    ("empty split", _edit(lambda d: d.update(train=[])), ["split 'train' is empty"]),
    ("study not an object", _edit(lambda d: d["train"].__setitem__(1, "x")), ["train[1]", "expected an object"]),
    ("missing id", _edit(lambda d: d["train"][0].pop("id")), ["train[0]", "missing field 'id'"]),
    ("missing report", _edit(lambda d: d["val"][1].pop("report")), ["study 'val1'", "missing field 'report'"]),
    ("report not a string", _edit(lambda d: d["val"][0].update(report=3)), ["study 'val0'", "'report' must be a string"]),
    ("missing image_path", _edit(lambda d: d["test"][0].pop("image_path")), ["study 'test0'", "'image_path'"]),
    ("image_path not a list", _edit(lambda d: d["test"][1].update(image_path="a.png")), ["study 'test1'", "list of relative paths"]),
    ("one view for iu_xray", _edit(lambda d: d["train"][1]["image_path"].pop()), ["study 'train1'", "needs 2 per study"]),
    ("missing image", lambda p: (p.parent / "images" / "test1" / "1.png").unlink(), ["study 'test1'", "1.png", "does not exist"]),
    ("unreadable image", _corrupt_image, ["study 'val1'", "0.png", "cannot read image"]),
]


@pytest.mark.parametrize("name,damage,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_annotation_is_one_clear_error(tmp_path: Path, name: str, damage, expected: list[str]) -> None:
    path = _write_set(tmp_path)
    damage(path)
    with pytest.raises(DataError) as info:
        load_annotation(path, dataset="iu_xray")
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (name, message)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name,damage,expected", [BAD_CASES[1], BAD_CASES[9], BAD_CASES[15]],
                         ids=["not JSON", "missing report", "unreadable image"])
def test_cli_bad_annotation_exits_2_and_writes_nothing(tmp_path: Path, name: str, damage, expected) -> None:
    path = _write_set(tmp_path / "data")
    damage(path)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["plain", "--preset", "tiny", "--device", "cpu", "--ann-path", str(path),
                                      "--run-dir", str(runs)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and expected[-1] in lines[-1]
    assert not runs.exists()


def test_missing_image_dir_names_the_flag(tmp_path: Path) -> None:
    path = _write_set(tmp_path)
    with pytest.raises(DataError, match="--image-dir"):
        load_annotation(path, image_dir=tmp_path / "nowhere")


def test_mimic_uses_one_view_and_iu_two(tmp_path: Path) -> None:
    path = _write_set(tmp_path, views=2)
    tokenizer = Tokenizer.from_reports("iu_xray", ["the heart is normal"] * 3, threshold=3)
    for dataset, views in (("iu_xray", 2), ("mimic_cxr", 1)):
        ann = load_annotation(path, dataset=dataset)
        assert all(len(s.images) == views for s in ann.splits["train"])
        ds = ReportDataset(ann.splits["train"], tokenizer, 60, build_transform(32, train=False))
        batch = collate([ds[0], ds[1]])
        assert batch["images"].shape == (2, views, 3, 32, 32)
        assert batch["targets"][:, 0].eq(0).all()  # bos
        assert batch["masks"].dtype == torch.float32


def test_a_seeded_item_seeds_only_the_cpu_generator_and_puts_it_back(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """(index, seed) keys seed the CPU generator for the crop and flip only: torch.manual_seed would also
    reseed the GPUs' generators (dropout's), which then followed the data's seeds in a loader without
    workers. Every device's seeding goes through torch.cuda.manual_seed_all, recorded here."""
    path = _write_set(tmp_path)
    tokenizer = Tokenizer.from_reports("iu_xray", ["the heart is normal"] * 3, threshold=3)
    ds = ReportDataset(load_annotation(path).splits["train"], tokenizer, 60, build_transform(32, train=True))
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first, again = ds[(0, 11)], ds[(0, 11)]
    assert seeded == [5]  # only this test's own seeding above
    assert torch.equal(torch.get_rng_state(), before)  # the CPU generator is put back too
    assert torch.equal(first[1], again[1])  # the same seed, the same crop


def test_transforms_match_r2gen_at_224() -> None:
    train = build_transform(224, train=True)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[0].size == 256 and train.transforms[1].size == (224, 224)
    evaluation = build_transform(224, train=False)
    assert evaluation.transforms[0].size == (224, 224)
    img = Image.new("RGB", (300, 260))
    assert train(img).shape == evaluation(img).shape == (3, 224, 224)
