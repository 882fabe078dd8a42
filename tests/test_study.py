"""The precision study on CPU: fp32 and bf16 on the tiny preset (fp8 listed as skipped with its
reason), summary.json with every field, a report.html that renders in headless Chromium with its
charts and samples, a rerun that keeps the finished precisions; the planning pieces on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import assert_renders
from launcher.cli import app
from launcher.study import STUDY_PRECISIONS, StudyRequest, parse_precisions, recommend, run_command, skip_reason
from r2gen.scores import SCORE_KEYS
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["study", "--precisions", "fp32,bf16,fp8", "--device", "cpu", "--epochs", "1", "--studies", "20",
         "--beam-size", "1", "--num-workers", "0"]
ROW_FIELDS = {"precision", "status", "reason", "run_dir", "micro_batch", "wall_s", "samples_per_s", "peak_vram_gib",
              "gpu_util_pct", "train_loss", "val_loss", "test_loss", "metrics", "generation_samples_per_s",
              "loss_curve", "test_reports"}


def _study(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *STUDY, "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)


def test_cpu_study_writes_summary_and_a_report_that_renders(tmp_path: Path) -> None:
    result = _study(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "study"
    summary = json.loads((folder / "summary.json").read_text())
    assert {"title", "created", "hardware", "preset", "backend", "epochs", "rule", "recommended",
            "precisions"} <= summary.keys()
    fp32, bf16, fp8 = summary["precisions"]
    for row in (fp32, bf16):
        assert row["status"] == "done" and ROW_FIELDS <= row.keys(), row.keys()
        assert row["samples_per_s"] > 0 and row["wall_s"] > 0 and row["micro_batch"] >= 1
        assert all(row[k] > 0 for k in ("train_loss", "val_loss", "test_loss", "generation_samples_per_s"))
        assert set(row["metrics"]) == set(SCORE_KEYS) and row["metrics"]["BLEU_4"] is not None
        assert set(row["findings"]) == {"findings_macro_f1", "findings_exact_match"}  # the embedded set's labels
        assert row["baseline"]["findings_macro_f1"] is not None and row["baseline"]["BLEU_4"] is not None
        assert len(row["loss_curve"]) == 1 and len(row["test_reports"]) == 4  # 14 train studies: one batch of 32; 4 test
        assert row["peak_vram_gib"] is None and row["gpu_util_pct"] is None  # a CPU run
    assert fp8["status"] == "skipped" and "needs a CUDA GPU" in fp8["reason"]
    assert summary["recommended"] in ("fp32", "bf16")
    reports = {r["id"]: r for r in fp32["test_reports"]}
    first = sorted(reports)[0]
    bf16_first = next(r for r in bf16["test_reports"] if r["id"] == first)
    assert_renders(folder / "report.html", [first, reports[first]["ground_truth"], reports[first]["generated"],
                                            bf16_first["generated"]], tmp_path / "report.png")
    assert "recommended" in result.stdout and str(folder / "report.html") in result.stdout.replace("\n", "")

    # Run again: both finished precisions are kept, nothing retrains.
    again = _study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished before; kept") == 2
    kept = json.loads((folder / "summary.json").read_text())["precisions"]
    assert [r["wall_s"] for r in kept[:2]] == [fp32["wall_s"], bf16["wall_s"]]


def test_precisions_are_parsed_strictly() -> None:
    assert parse_precisions("fp32, bf16") == ["fp32", "bf16"]
    for text, needle in (("", "at least one"), ("fp32,int8", "unknown 'int8'"), ("bf16,bf16", "twice")):
        with pytest.raises(Exception, match=needle):
            parse_precisions(text)
    assert set(STUDY_PRECISIONS) == {"fp32", "fp16", "bf16", "fp8"}


def test_bad_study_requests_exit_2_with_one_line(tmp_path: Path) -> None:
    for args, needle in ((["--precisions", "fp64"], "--precisions: unknown 'fp64'"),
                         (["--backend", "jax"], "--backend: unknown 'jax'")):
        result = CliRunner().invoke(app, ["study", *args, "--run-dir", str(tmp_path)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not any(tmp_path.iterdir())


def _row(precision: str, speed: float, bleu4: float) -> dict:
    return {"precision": precision, "status": "done", "samples_per_s": speed, "metrics": {"BLEU_4": bleu4}}


def test_recommendation_rule() -> None:
    # bf16 is fastest within 0.02 BLEU-4 of the best; fp8 is faster still but 0.05 worse.
    rows = [_row("fp32", 50, 0.15), _row("bf16", 90, 0.14), _row("fp8", 120, 0.10),
            {"precision": "fp16", "status": "skipped", "reason": "x"}]
    assert recommend(rows) == "bf16"
    assert recommend([_row("fp32", 50, 0.1), _row("bf16", 50, 0.1)]) == "fp32"  # a tie goes to the wider format
    assert recommend([{"precision": "fp32", "status": "failed", "reason": "x"}]) is None


def test_run_commands_and_skip_reasons(tmp_path: Path) -> None:
    request = StudyRequest(["fp32", "fp8"], "accelerate", tmp_path / "s", "cuda", "iu_xray", ["--epochs", "2"])
    assert run_command(request, "fp32", False)[3:] == ["accelerate", "--run-dir", str(tmp_path / "s" / "runs"),
                                                       "--name", "fp32", "--precision", "fp32", "--device", "cuda",
                                                       "--preset", "iu_xray", "--epochs", "2"]
    assert run_command(request, "fp8", False)[3:5] == ["fp8", "--run-dir"] and "--precision" not in \
        run_command(request, "fp8", False)
    assert run_command(request, "fp32", True)[-1] == "--keep-training"
    verdicts = {"accelerate": {"fp16": "Accelerate runs fp16 on GPUs only"}, "fp8": {"fp8": "needs a CUDA GPU"}}
    assert skip_reason("accelerate", "fp16", verdicts) == "accelerate fp16: Accelerate runs fp16 on GPUs only"
    assert skip_reason("accelerate", "fp8", verdicts) == "fp8: needs a CUDA GPU"
    assert skip_reason("deepspeed", "fp32", {"deepspeed": {}}) == "deepspeed fp32: deepspeed has no fp32 mode"
