"""generate on new studies, and the published R2Gen's checkpoints.

`generate` on a folder of studies (or an annotation without reports) writes one report per study,
the very reports evaluation gives the same images; bad input is one line, exit 2, before any model
work. A checkpoint in the published code's format (made here from our model's state_dict and saved
the way its trainer saves it) evaluates, generates and fine-tunes; a vocabulary that does not fit it,
a truncated file and a file whose pickle would run code are refused with exit 2 and one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backends.registry import build_backend
from launcher.cli import app
from r2gen.build import prepare
from r2gen.checkpoint import load_checkpoint
from r2gen.config import PRESETS
from r2gen.data.datasets import annotation_dataset, folder_studies, load_annotation
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import DataError
from r2gen.model.r2gen import ModelConfig, R2GenModel
from child_env import run_cli

RUN = ["--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--beam-size", "2",
       "--num-workers", "0", "--precision", "fp32"]
CPU = ["--device", "cpu", "--num-workers", "0"]
SMALL = ModelConfig(backbone="resnet18", d_model=128, d_ff=128, num_layers=1, rm_d_model=128)
"""A small model with the published code's head counts (8): what its shapes say, it is."""


def _invoke(args: list[str]) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def _refused(args: list[str], needle: str, hints: bool = False) -> str:
    """Exit 2 with one line naming the problem (after a training command's data hints, where `hints`)."""
    code, lines = _invoke(args)
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and (hints or len(lines) == 1), (args, lines)
    assert lines[-1] == errors[0] and needle in errors[0], (args, lines)
    return errors[0]


@pytest.fixture(scope="module")
def run(module_scratch) -> Path:
    tmp = module_scratch("generate")
    result = run_cli(["plain", *RUN, "--run-dir", str(tmp), "--name", "plain"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "plain"


def _annotation(run: Path) -> Path:
    return Path(json.loads((run / "config.json").read_text())["annotation"])


def _study_folder(annotation: Path, folder: Path) -> list[str]:
    """The test split's studies as new ones: a folder each, its two views copied from the set's PNGs."""
    entries = json.loads(annotation.read_text())["test"]
    for entry in entries:
        (folder / entry["id"]).mkdir(parents=True)
        for view, image in enumerate(entry["image_path"]):
            shutil.copy(annotation.parent / "images" / image, folder / entry["id"] / f"{view}.png")
    return [e["id"] for e in entries]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def published(run: Path, module_scratch) -> dict[str, Path]:
    """Our model's state_dict saved as the published trainer saves it (after an optimizer step, with a
    numpy monitor_best), its twin in our own format, and one whose logit layer is 3 words too wide."""
    tmp = module_scratch("published")
    annotation = load_annotation(_annotation(run), None, "iu_xray", check_images=False)
    tokenizer = Tokenizer.from_reports("iu_xray", (s.report for s in annotation.splits["train"]))
    files = {}
    for name, extra in (("model_iu_xray.pth", 0), ("too_wide.pth", 3)):
        torch.manual_seed(0)
        model = R2GenModel(SMALL, len(tokenizer) + extra)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-9, amsgrad=True)
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
        files[name] = tmp / name
        torch.save({"epoch": 7, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "monitor_best": np.float64(0.125)}, files[name])
        if not extra:
            config = dataclasses.replace(PRESETS["iu_xray"], model=SMALL)
            files["ours.pt"] = tmp / "ours.pt"
            torch.save({"model": model.state_dict(), "config": config.to_dict(), "tokenizer": tokenizer.to_json(),
                        "step": 0}, files["ours.pt"])
    return files


def test_generate_writes_one_report_per_study_as_evaluation_does(run: Path, tmp_path: Path) -> None:
    ids = _study_folder(_annotation(run), tmp_path / "new")
    code, lines = _invoke(["generate", "--checkpoint", str(run), "--input", str(tmp_path / "new"), *CPU])
    assert code == 0, lines
    out = run / "reports" / "generate-new-best-beam2"  # the default: beside the run's own reports
    rows = _rows(out)
    own = json.loads((run / "reports" / "test_epoch001.json").read_text())  # best.pt is the last epoch's
    assert [r["id"] for r in rows] == ids == [r["id"] for r in own]
    assert [r["report"] for r in rows] == [r["generated"] for r in own]  # the eval transform, the same beam search
    assert rows[0]["images"] == [str(tmp_path / "new" / ids[0] / f"{v}.png") for v in (0, 1)]
    assert all(set(r["findings"]) == {"heart", "effusion", "opacity", "pneumothorax", "device"} for r in rows)
    csv = (out / "reports.csv").read_text().splitlines()
    assert csv[0] == "id,images,report,heart,effusion,opacity,pneumothorax,device" and len(csv) == len(ids) + 1

    _refused(["generate", "--checkpoint", str(run), "--input", str(tmp_path / "new"), *CPU], "already holds reports")
    # The same studies as an annotation without reports (one empty, the others absent), --force over the old ones.
    entries = json.loads(_annotation(run).read_text())["test"]
    listed = [{"id": e["id"], "image_path": e["image_path"], **({"report": ""} if i == 0 else {})}
              for i, e in enumerate(entries)]
    (tmp_path / "new.json").write_text(json.dumps({"test": listed}))
    code, lines = _invoke(["generate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--input",
                           str(tmp_path / "new.json"), "--image-dir", str(_annotation(run).parent / "images"),
                           "--out", str(out), "--force", *CPU])
    assert code == 0, lines
    assert [r["report"] for r in _rows(out)] == [r["generated"] for r in own]


def test_bad_generate_input_is_one_line_before_any_model_work(run: Path, tmp_path: Path) -> None:
    annotation = _annotation(run)
    _study_folder(annotation, tmp_path / "good")
    first = sorted((tmp_path / "good").iterdir())[0]
    bad = {}
    for case in ("one view", "not an image", "loose file", "empty"):
        bad[case] = tmp_path / case.replace(" ", "_")
        shutil.copytree(tmp_path / "good", bad[case])
    (bad["one view"] / first.name / "1.png").unlink()
    (bad["not an image"] / first.name / "1.png").write_bytes(b"not a png")
    shutil.copy(first / "0.png", bad["loose file"] / "extra.png")
    shutil.rmtree(bad["empty"]), bad["empty"].mkdir()
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"test": [{"id": "x", "image_path": ["x/0.png", "x/1.png"]}]}))
    (tmp_path / "images").mkdir()
    cases = [(["--input", str(tmp_path / "absent")], "--input: "),
             (["--input", str(bad["one view"])], "1 file(s); a iu_xray study folder holds its 2 view(s)"),
             (["--input", str(bad["not an image"])], f"cannot read image {bad['not an image'] / first.name / '1.png'}"),
             (["--input", str(bad["loose file"])], "extra.png: a file right in"),
             (["--input", str(bad["empty"])], "holds no studies"),
             (["--input", str(missing)], f"image {tmp_path / 'images' / 'x' / '0.png'} does not exist"),
             (["--input", str(tmp_path / "good"), "--ann-path", str(annotation)], "--ann-path: only for a published"),
             (["--input", str(tmp_path / "good"), "--beam", "0"], "--beam-size: must be at least 1")]
    before = sorted((run / "reports").iterdir())
    for args, needle in cases:
        _refused(["generate", "--checkpoint", str(run), *args, *CPU], needle)
    assert sorted((run / "reports").iterdir()) == before  # nothing written for any of them


def test_a_published_checkpoint_evaluates_and_generates(run: Path, published: dict[str, Path], tmp_path: Path) -> None:
    annotation = _annotation(run)
    got = {}
    for name in ("model_iu_xray.pth", "ours.pt"):
        out = tmp_path / f"{name}.json"
        code, lines = _invoke(["evaluate", "--checkpoint", str(published[name]), "--ann-path", str(annotation),
                               "--out", str(out), *CPU])
        assert code == 0, lines
        got[name] = json.loads(out.read_text())
    # Shape, configuration and vocabulary read from the published file are what our twin says outright.
    assert got["model_iu_xray.pth"]["reports"] == got["ours.pt"]["reports"]
    assert got["model_iu_xray.pth"]["scores"] == got["ours.pt"]["scores"]
    assert got["model_iu_xray.pth"]["beam_size"] == 3 and len(got["ours.pt"]["reports"]) == 4  # the iu_xray preset's

    ids = _study_folder(annotation, tmp_path / "new")
    code, lines = _invoke(["generate", "--checkpoint", str(published["model_iu_xray.pth"]), "--input",
                           str(tmp_path / "new"), "--ann-path", str(annotation), "--out", str(tmp_path / "out"), *CPU])
    assert code == 0, lines
    rows = _rows(tmp_path / "out")
    assert [r["id"] for r in rows] == ids
    assert [r["report"] for r in rows] == [r["generated"] for r in got["model_iu_xray.pth"]["reports"]]


def test_published_checkpoints_that_cannot_serve_are_one_line_exit_2(run: Path, published: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    annotation = _annotation(run)
    words = len(Tokenizer.from_json((run / "tokenizer.json").read_text()))
    line = _refused(["evaluate", "--checkpoint", str(published["too_wide.pth"]), "--ann-path", str(annotation), *CPU],
                    f"has {words} words, {published['too_wide.pth']}'s logit layer {words + 3}")
    assert line.startswith("error: --ann-path:")
    _study_folder(annotation, tmp_path / "new")
    _refused(["generate", "--checkpoint", str(published["too_wide.pth"]), "--input", str(tmp_path / "new"),
              "--ann-path", str(annotation), *CPU], f"logit layer {words + 3}")
    _refused(["evaluate", "--checkpoint", str(published["model_iu_xray.pth"]), *CPU],
             "--ann-path: " + f"{published['model_iu_xray.pth']} is a published R2Gen checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(published["model_iu_xray.pth"].read_bytes()[:100_000])
    _refused(["evaluate", "--checkpoint", str(truncated), "--ann-path", str(annotation), *CPU],
             f"--checkpoint: {truncated} is not a readable checkpoint")
    train = ["plain", *RUN, "--ann-path", str(annotation), "--run-dir", str(tmp_path), "--dry-run", "--init-from"]
    _refused([*train, str(truncated)], f"--init-from: {truncated} is not a readable checkpoint", hints=True)
    _refused([*train, str(published["too_wide.pth"])], f"logit layer {words + 3}", hints=True)
    marker = tmp_path / "ran"
    doctored = tmp_path / "doctored.pth"  # monitor_best whose unpickling would run a command
    state = load_checkpoint(published["model_iu_xray.pth"])
    torch.save({**state, "monitor_best": _RunsCode(marker)}, doctored)
    _refused(["evaluate", "--checkpoint", str(doctored), "--ann-path", str(annotation), *CPU], "system")
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_init_from_starts_a_model_from_every_weight(run: Path, published: dict[str, Path]) -> None:
    annotation = load_annotation(_annotation(run), None, "iu_xray", check_images=False)
    backend = build_backend("plain", "cpu", "fp32")
    for path, key in ((published["model_iu_xray.pth"], "state_dict"), (run / "checkpoints" / "best.pt", "model")):
        weights = load_checkpoint(path)[key]
        prep = prepare(PRESETS["tiny"], backend, annotation, None, init_from=path)
        got = prep.model.state_dict()
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got), path
        assert prep.init_from == path and str(path) in prep.weights_source
        assert prep.tokenizer.to_json() == (run / "tokenizer.json").read_text()  # R2Gen's rule: the same words


def test_a_published_checkpoint_fine_tunes(run: Path, published: dict[str, Path], tmp_path: Path) -> None:
    start = published["model_iu_xray.pth"]
    _refused(["plain", *RUN, "--init-from", str(start), "--keep-training", "--run-dir", str(tmp_path)],
             "--init-from: a continued run goes on from its own checkpoint")
    result = run_cli(["plain", *RUN, "--ann-path", str(_annotation(run)), "--init-from", str(start),
                   "--run-dir", str(tmp_path), "--name", "tuned"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"fine-tune: every weight from published R2Gen checkpoint {start} (epoch 7)" in result.stderr
    facts = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert facts["init_from"] == str(start) and "published R2Gen checkpoint" in facts["visual_weights"]
    model = facts["train"]["model"]  # the checkpoint's shape, the published heads; the preset's training
    assert (model["backbone"], model["d_model"], model["num_heads"]) == ("resnet18", 128, 8)
    assert facts["train"]["image_size"] == 32
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (run / "tokenizer.json").read_text()
    assert (tmp_path / "tuned" / "checkpoints" / "best.pt").is_file()


def test_the_data_set_kind_and_a_mimic_folder(small_set: Path, tmp_path: Path) -> None:
    """The kind a published checkpoint's annotation has (one image per study: MIMIC-CXR); a MIMIC-CXR
    folder of new studies holds an image per study, as a file or in a study folder of its own."""
    assert annotation_dataset(small_set) == "iu_xray"
    entries = json.loads(small_set.read_text())
    single = {split: [{**e, "image_path": e["image_path"][:1]} for e in studies] for split, studies in entries.items()}
    (tmp_path / "mimic.json").write_text(json.dumps(single))
    assert annotation_dataset(tmp_path / "mimic.json") == "mimic_cxr"

    images = small_set.parent / "images"
    folder = tmp_path / "new"
    (folder / "s2").mkdir(parents=True)
    shutil.copy(images / "synth_00000" / "0.png", folder / "s1.png")
    shutil.copy(images / "synth_00001" / "0.png", folder / "s2" / "frontal.png")
    studies = folder_studies(folder, "mimic_cxr")
    assert [(s.id, s.images) for s in studies] == [("s1", (folder / "s1.png",)),
                                                   ("s2", (folder / "s2" / "frontal.png",))]
    shutil.copy(images / "synth_00001" / "1.png", folder / "s2" / "lateral.png")
    with pytest.raises(DataError, match="2 file\\(s\\); a mimic_cxr study folder holds its 1 view"):
        folder_studies(folder, "mimic_cxr")
