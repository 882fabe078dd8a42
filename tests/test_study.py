"""The precision study on CPU: fp32 and bf16 on the tiny preset over two seeds (fp8 listed as skipped
with its reason), summary.json with every field and each figure over the seeds, a report.html that
renders in headless Chromium with its per-seed points, charts and samples, a rerun that keeps the
finished runs; the planning pieces (the spread rule among them) on their own."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import assert_renders
from launcher.cli import app
from launcher.study import (STUDY_PRECISIONS, StudyRequest, aggregate, comparisons, parse_precisions, quality_key,
                            recommend, run_command, skip_reason)
from r2gen.scores import SCORE_KEYS
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["study", "--precisions", "fp32,bf16,fp8", "--device", "cpu", "--epochs", "1", "--studies", "20",
         "--beam-size", "1", "--num-workers", "0", "--seeds", "2", "--target", "0.0"]
ROW_FIELDS = {"precision", "status", "reason", "run_dir", "micro_batch", "wall_s", "samples_per_s", "peak_vram_gib",
              "gpu_util_pct", "train_loss", "val_loss", "test_loss", "metrics", "generation_samples_per_s",
              "loss_curve", "test_reports", "runs", "seeds", "spread", "time_to_target_s", "reached_target"}


def _study(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *STUDY, "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)


def test_cpu_study_writes_summary_and_a_report_that_renders(tmp_path: Path) -> None:
    result = _study(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "study"
    summary = json.loads((folder / "summary.json").read_text())
    assert {"title", "created", "hardware", "preset", "backend", "epochs", "seeds", "target_f1", "rule", "quality_key",
            "recommended", "comparisons", "precisions"} <= summary.keys()
    assert summary["seeds"] == [9223, 9224] and summary["quality_key"] == "findings_macro_f1"
    fp32, bf16, fp8 = summary["precisions"]
    for row in (fp32, bf16):
        assert row["status"] == "done" and ROW_FIELDS <= row.keys(), row.keys()
        assert [run["seed"] for run in row["runs"]] == [9223, 9224] and row["seeds"] == [9223, 9224]
        runs = [run["samples_per_s"] for run in row["runs"]]
        assert row["spread"]["samples_per_s"]["runs"] == runs and row["samples_per_s"] == pytest.approx(sum(runs) / 2)
        assert [run["run_dir"] for run in row["runs"]] == [str(tmp_path / "study" / "runs" / f"{row['precision']}-s{seed}")
                                                          for seed in (9223, 9224)]
        # target 0: the first val evaluation reaches it, some seconds after each run's command started
        assert all(0 < run["time_to_target_s"] < run["wall_s"] for run in row["runs"]) and row["reached_target"] == 2
        assert row["samples_per_s"] > 0 and row["wall_s"] > 0 and row["micro_batch"] >= 1
        assert all(row[k] > 0 for k in ("train_loss", "val_loss", "test_loss", "generation_samples_per_s"))
        assert set(row["metrics"]) == set(SCORE_KEYS) and row["metrics"]["BLEU_4"] is not None
        assert set(row["findings"]) == {"findings_macro_f1", "findings_exact_match"}  # the embedded set's labels
        assert row["baseline"]["findings_macro_f1"] is not None and row["baseline"]["BLEU_4"] is not None
        assert len(row["loss_curve"]) == 1 and len(row["test_reports"]) == 4  # 14 train studies: one batch of 32; 4 test
        assert row["peak_vram_gib"] is None and row["gpu_util_pct"] is None  # a CPU run
        assert row["engine"].startswith(f"plain on cpu ({row['precision']})")  # what ran, from its config.json
    assert fp8["status"] == "skipped" and "needs a CUDA GPU" in fp8["reason"]
    assert summary["recommended"] in ("fp32", "bf16") and set(summary["comparisons"]) == {"fp32", "bf16"}
    reports = {r["id"]: r for r in fp32["test_reports"]}
    first = sorted(reports)[0]
    bf16_first = next(r for r in bf16["test_reports"] if r["id"] == first)
    assert_renders(folder / "report.html", [first, reports[first]["ground_truth"], reports[first]["generated"],
                                            bf16_first["generated"]],
                   tmp_path / "report.png", charts=4)
    seeds_chart = re.search(r'<img\b[^>]*id="chart-seeds"[^>]*>', (folder / "report.html").read_text()).group(0)
    svg = base64.b64decode(re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', seeds_chart).group(1)).decode()
    assert svg.count('class="seed-point"') == 4  # 2 precisions x 2 seeds, each a point
    assert "recommended" in result.stdout and str(folder / "report.html") in result.stdout.replace("\n", "")

    # Run again: every finished run is kept, nothing retrains.
    again = _study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished before; kept") == 4
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
                         (["--backend", "jax"], "--backend: unknown 'jax'"),
                         (["--seeds", "0"], "--seeds: at least 1, got 0"),
                         (["--target", "1.5"], "--target: a findings macro-F1 between 0 and 1, got 1.5")):
        result = CliRunner().invoke(app, ["study", *args, "--run-dir", str(tmp_path)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert not any(tmp_path.iterdir())


def _row(precision: str, speed: float, f1: list[float], bleu4: list[float] | None = None) -> dict:
    spread = {"findings_macro_f1": {"runs": f1} if f1 else None, "BLEU_4": {"runs": bleu4 or f1}}
    return {"precision": precision, "status": "done", "samples_per_s": speed, "spread": spread}


def test_recommendation_is_the_fastest_within_the_best_precisions_spread() -> None:
    # fp32 is best (mean 0.93, s 0.02); bf16 (0.91, s 0.02) differs by 1.2 standard errors of the difference:
    # within; fp8 is faster still, but 0.83 is 6 standard errors below: outside.
    rows = [_row("fp32", 50, [0.91, 0.93, 0.95]), _row("bf16", 90, [0.89, 0.91, 0.93]),
            _row("fp8", 120, [0.81, 0.83, 0.85]), {"precision": "fp16", "status": "skipped", "reason": "x"}]
    assert recommend(rows) == "bf16"
    assert comparisons(rows) == {"fp32": "best", "bf16": "within the spread", "fp8": "outside the spread"}
    # one seed: no spread is measured, only the best qualifies, however close
    assert recommend([_row("fp32", 50, [0.93]), _row("bf16", 90, [0.929])]) == "fp32"
    assert recommend([_row("fp32", 50, [0.9, 0.9]), _row("bf16", 50, [0.9, 0.9])]) == "fp32"  # a tie: the wider
    # no findings labels (user data): BLEU-4 decides
    rows = [_row("fp32", 50, [], [0.15, 0.16]), _row("bf16", 90, [], [0.10, 0.11])]
    assert quality_key(rows) == "BLEU_4" and recommend(rows) == "fp32"
    assert recommend([{"precision": "fp32", "status": "failed", "reason": "x"}]) is None


def test_a_precision_row_is_the_mean_over_its_seeds_runs() -> None:
    def run(seed, speed, f1, peak, reached):
        return {"seed": seed, "status": "done", "samples_per_s": speed, "peak_vram_gib": peak, "time_to_target_s": reached,
                "metrics": {"BLEU_4": f1 / 2}, "findings": {"findings_macro_f1": f1, "findings_exact_match": f1},
                "run_dir": f"r{seed}", "micro_batch": 8, "loss_curve": [[1, 2.0]], "test_reports": [], "wall_s": 10.0}

    row = aggregate("bf16", [run(1, 100.0, 0.9, 2.0, 30.0), run(2, 120.0, 0.8, 2.5, None)])
    assert row["status"] == "done" and row["samples_per_s"] == 110.0 and row["peak_vram_gib"] == 2.5
    assert row["findings"]["findings_macro_f1"] == pytest.approx(0.85) and row["wall_s"] == 20.0
    assert row["time_to_target_s"] is None and row["reached_target"] == 1  # a seed that never reached it
    assert row["spread"]["findings_macro_f1"]["runs"] == [0.9, 0.8] and row["spread"]["time_to_target_s"]["runs"] == [30.0]
    waiting = aggregate("bf16", [run(1, 100.0, 0.9, 2.0, 30.0), {"seed": 2, "status": "pending", "reason": None}])
    assert waiting["status"] == "pending" and waiting["samples_per_s"] == 100.0


def test_run_commands_and_skip_reasons(tmp_path: Path) -> None:
    request = StudyRequest(["fp32", "fp8"], "accelerate", tmp_path / "s", "cuda", "iu_xray", ["--epochs", "2"], [7, 8])
    assert run_command(request, "fp32", 8, False)[3:] == ["accelerate", "--run-dir", str(tmp_path / "s" / "runs"),
                                                          "--name", "fp32-s8", "--precision", "fp32", "--device", "cuda",
                                                          "--preset", "iu_xray", "--seed", "8", "--epochs", "2"]
    assert run_command(request, "fp8", 7, False)[3:5] == ["fp8", "--run-dir"] and "--precision" not in \
        run_command(request, "fp8", 7, False)
    assert run_command(request, "fp32", 7, True)[-1] == "--keep-training"
    assert "--seed" not in run_command(request, "fp32", None, False)  # no seeds named: the preset's own
    verdicts = {"accelerate": {"fp16": "Accelerate runs fp16 on GPUs only"}, "fp8": {"fp8": "needs a CUDA GPU"}}
    assert skip_reason("accelerate", "fp16", verdicts) == "accelerate fp16: Accelerate runs fp16 on GPUs only"
    assert skip_reason("accelerate", "fp8", verdicts) == "fp8: needs a CUDA GPU"
    assert skip_reason("deepspeed", "fp32", {"deepspeed": {}}) == "deepspeed fp32: deepspeed has no fp32 mode"
