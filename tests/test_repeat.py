"""`--seeds N` on a training command (launcher.repeat): each seed's command line, the scores over
seeds, and two real tiny runs through the CLI that a second call keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from child_env import repo_pythonpath
from launcher.repeat import scores_over_seeds, seed_argv


def test_each_seed_gets_the_command_line_with_its_seed_and_name() -> None:
    argv = ["plain", "--seeds", "3", "--seed=5", "--epochs", "2", "--name", "x", "--keep-training", "--device", "cpu"]
    assert seed_argv(argv, 7, "x-s7", resume=False) == ["plain", "--epochs", "2", "--device", "cpu", "--seed", "7",
                                                        "--name", "x-s7"]
    assert seed_argv(["auto", "--seeds=2"], 9, "y-s9", resume=True) == ["auto", "--seed", "9", "--name", "y-s9",
                                                                        "--keep-training"]


def test_scores_over_seeds_are_each_runs_last_test_scores(tmp_path: Path) -> None:
    for i, (bleu, f1) in enumerate(((0.5, 0.8), (0.7, 0.9))):
        run = tmp_path / f"r{i}"
        run.mkdir()
        records = [{"test/BLEU_4": 0.1}, {"step": 3}, {"test/BLEU_4": bleu, "test/findings_macro_f1": f1,
                                                       "baseline_test/BLEU_4": 0.55}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = scores_over_seeds([tmp_path / "r0", tmp_path / "r1"])
    assert scores["test/BLEU_4"]["runs"] == [0.5, 0.7] and scores["test/BLEU_4"]["mean"] == pytest.approx(0.6)
    assert scores["test/findings_macro_f1"]["runs"] == [0.8, 0.9] and scores["baseline_test/BLEU_4"]["std"] == 0.0
    assert scores["test/CIDEr"] is None  # never logged


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)


@pytest.mark.slow
def test_two_seeds_through_the_cli_then_kept(tmp_path: Path) -> None:
    args = ["plain", "--device", "cpu", "--preset", "tiny", "--studies", "12", "--epochs", "1", "--num-workers", "0",
            "--seeds", "2", "--seed", "11", "--name", "s", "--run-dir", "runs"]
    first = _cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "s-seeds.json").read_text())
    assert summary["seeds"] == [11, 12] and summary["runs"] == ["runs/s-s11", "runs/s-s12"]
    for seed in (11, 12):
        config = json.loads((tmp_path / "runs" / f"s-s{seed}" / "config.json").read_text())
        assert config["train"]["seed"] == seed and config["train"]["epochs"] == 1
    assert len(summary["scores"]["test/BLEU_4"]["runs"]) == 2
    assert "test scores over 2 seeds (11, 12)" in first.stdout and "BLEU_4" in first.stdout
    again = _cli(tmp_path, *args)
    assert again.returncode == 0 and again.stderr.count("finished before; kept") == 2, again.stderr[-2000:]


def test_seeds_refuses_a_dry_run_with_one_line(tmp_path: Path) -> None:
    result = _cli(tmp_path, "plain", "--device", "cpu", "--seeds", "2", "--dry-run")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "--seeds: not with --dry-run" in lines[0], lines
    assert not (tmp_path / "runs").exists()
