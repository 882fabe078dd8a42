"""evaluate --checkpoint: any engine's checkpoint (a step file, an engine's step folder, a run
directory) gives back exactly the reports and scores the run itself got at that point; bad
requests get one line and exit code 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.checkpoint import CheckpointStore
from r2gen.scores import SCORE_KEYS
from child_env import run_cli

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--beam-size", "2",
       "--num-workers", "0"]


@pytest.fixture(scope="module")
def runs(module_scratch) -> dict[str, Path]:
    tmp = module_scratch("evaluate")
    made = {}
    for engine in ("plain", "accelerate"):
        result = run_cli([engine, *RUN, "--precision", "fp32", "--run-dir", str(tmp), "--name", engine], tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        made[engine] = tmp / engine
    return made


@pytest.mark.parametrize("engine", ["plain", "accelerate"])
def test_a_checkpoint_gives_back_the_runs_own_test_reports(runs: dict[str, Path], engine: str, tmp_path) -> None:
    run = runs[engine]
    newest, _ = CheckpointStore(run / "checkpoints").newest_intact()  # the end of the last epoch
    assert newest.is_dir() == (engine == "accelerate")  # Accelerate's own save_state folder
    out = tmp_path / "eval.json"
    result = run_cli(["evaluate", "--checkpoint", str(newest), "--device", "cpu", "--num-workers", "0",
                   "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(out.read_text())
    own = json.loads((run / "reports" / "test_epoch001.json").read_text())
    assert got["reports"] == own  # the same weights, beam and data: the same reports, word for word
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if "test/BLEU_4" in r)
    for key in (*SCORE_KEYS, "loss"):
        assert got["scores"][key] == pytest.approx(final[f"test/{key}"]) if final[f"test/{key}"] is not None \
            else got["scores"][key] is None, key
    assert got["beam_size"] == 2 and got["split"] == "test" and "BLEU_4" in result.stdout
    # The CheXpert labeler's inputs beside the JSON and in the run's reports: one report per row, in order.
    for stem in (tmp_path / "eval", run / "reports" / "test_epoch001"):
        for key, suffix in (("generated", ".generated.csv"), ("ground_truth", ".truth.csv")):
            with open(stem.with_name(stem.name + suffix), newline="") as f:
                assert [row[0] for row in csv.reader(f)] == [r[key] for r in own], (stem, key)


def test_a_run_directory_means_its_best_checkpoint(runs: dict[str, Path], tmp_path) -> None:
    result = run_cli(["evaluate", "--checkpoint", str(runs["plain"]), "--split", "val", "--beam", "1", "--device", "cpu",
                   "--num-workers", "0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = runs["plain"] / "reports" / "evaluate-val-best-beam1.json"
    got = json.loads(written.read_text())
    assert got["checkpoint"].endswith("best.pt") and len(got["reports"]) == 2 and got["beam_size"] == 1


def test_bad_evaluate_requests(runs: dict[str, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [(["--checkpoint", str(tmp_path / "absent.pt")], "does not exist"),
             (["--checkpoint", str(garbage)], "is not a readable checkpoint"),
             (["--checkpoint", str(tmp_path / "empty")], "neither a checkpoint nor a run directory"),
             (["--checkpoint", str(runs["plain"]), "--split", "dev"], "--split: unknown 'dev'"),
             (["--checkpoint", str(runs["plain"]), "--beam", "0"], "--beam-size: must be at least 1")]
    for args, needle in cases:
        result = CliRunner().invoke(app, ["evaluate", *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, result.output)


def test_ce_on_a_runs_test_reports_lands_in_its_report(runs: dict[str, Path], tmp_path) -> None:
    """The labeler's inputs of the run's test evaluation, labelled (here by a rule on the words, standing in
    for the CheXpert labeler, which runs outside this project), scored by `ce --reports`: the scores go
    beside the evaluation and into the run's report.html; a labelled file in another order is refused."""
    run = runs["plain"]
    stem = run / "reports" / "test_epoch001"
    labelled = {}
    for kind in ("generated", "truth"):
        with open(stem.with_name(f"{stem.name}.{kind}.csv"), newline="") as f:
            reports = [row[0] for row in csv.reader(f)]
        rows = [["Reports", "Cardiomegaly", "Pleural Effusion"]]
        rows += [[r, "1" if "enlarged" in r else "0", "1" if "effusion" in r and "no" not in r else ""] for r in reports]
        labelled[kind] = tmp_path / f"{kind}_labeled.csv"
        with open(labelled[kind], "w", newline="") as f:
            csv.writer(f).writerows(rows)
    result = run_cli(["ce", "--generated", str(labelled["generated"]), "--truth", str(labelled["truth"]),
                      "--reports", str(stem.with_suffix(".json"))], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(stem.with_name(f"ce-{stem.name}.json").read_text())
    assert scores["studies"] == len(reports) and set(scores["observations"]) == {"Cardiomegaly", "Pleural Effusion"}
    html = (run / "report.html").read_text()
    assert "Clinical efficacy" in html and "Pleural Effusion" in html
    swapped = tmp_path / "swapped.csv"  # two true reports that differ, exchanged
    header, *lines = labelled["truth"].read_text().splitlines()
    i = next(i for i in range(1, len(lines)) if lines[i].split(",")[0] != lines[0].split(",")[0])
    lines[0], lines[i] = lines[i], lines[0]
    swapped.write_text("\n".join([header, *lines]) + "\n")
    refused = run_cli(["ce", "--generated", str(labelled["generated"]), "--truth", str(swapped),
                       "--reports", str(stem.with_suffix(".json"))], tmp_path)
    assert refused.returncode == 2 and "another order" in refused.stderr
