"""The bench scripts run end to end on a CPU (tiny sizes): a script that crashes would waste a GPU
session's few minutes. Nothing here is timed; the numbers are the scripts' business."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_generate_compares_the_reference_and_the_fast_generator(tmp_path: Path, small_set: Path) -> None:
    out = tmp_path / "generate.json"
    _run("generate.py", "--device", "cpu", "--studies", "4", "--batch-sizes", "2,4", "--ann-path", str(small_set),
         "--json", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [r["generator"] for r in rows] == ["reference (published)", "fast", "fast"]
    assert all(r["identical"] == 4 and r["samples_per_s"] > 0 for r in rows)


def test_train_throughput_runs_the_reference_the_auto_and_a_plain_row(tmp_path: Path, small_set: Path) -> None:
    out = tmp_path / "train.json"  # (auto-eager is auto without the GPU step speed-ups: on a CPU, the same step)
    _run("train_throughput.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--ann-path", str(small_set),
         "--rows", "reference,auto,plain:fp32:4", "--json", str(out), tmp_path=tmp_path)
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["reference", "auto", "plain:fp32:4"]
    assert all(r["samples_per_s"] > 0 and r["train_gflops_per_sample"] > 0 and r["mfu_pct"] > 0 for r in rows)


def test_timed_training_leaves_the_warm_up_off_the_clock_and_repeats_epochs() -> None:
    if str(ROOT) not in sys.path:  # bench/ is not an installed package
        sys.path.insert(0, str(ROOT))
    from bench.timing import time_training

    loader = [{"ids": list(range(n))} for n in (4, 4, 3)]  # an epoch: two full batches and a shorter last one
    seen, stepped = [], []
    timing = time_training(loader, lambda batch: stepped.append(len(batch["ids"])), torch.device("cpu"), warmup=2,
                           steps=4, first_batch=lambda batch: seen.append(len(batch["ids"])))
    assert stepped == [4, 4, 3, 4, 4, 3] and seen == [4]  # into the second epoch; the first batch seen once
    assert (timing.steps, timing.samples) == (4, 3 + 4 + 4 + 3)  # the studies of the timed steps only
    assert timing.samples_per_s > 0 and timing.peak_allocated_gib is None


@pytest.mark.parametrize("script, args", [("loader.py", ["--studies", "4", "--image-size", "32"]),
                                          ("profile_step.py", ["--device", "cpu", "--batch-size", "2", "--reps", "1"]),
                                          ("batchnorm.py", ["--device", "cpu", "--batch-size", "2", "--image-size", "32",
                                                            "--reps", "1"])])
def test_profiling_scripts_print_their_tables(tmp_path: Path, script: str, args: list[str]) -> None:
    result = _run(script, *args, tmp_path=tmp_path)
    assert "ms" in result.stdout


def _row(name: str, curve: list[tuple[float, float]]) -> dict:
    return {"row": name, "run_dir": "-", "curve": curve, "wall_s": curve[-1][0], "epochs": len(curve), "steps": 1,
            "best_val_f1": max(f for _, f in curve), "test_f1": 0.5, "test_bleu4": 0.6, "baseline_bleu4": 0.55,
            "samples_per_s": 10.0}


def test_time_to_quality_merges_rows_measured_in_separate_commands(tmp_path: Path) -> None:
    (tmp_path / "pub.json").write_text(json.dumps({"title": "H200 a", "rows": [
        _row("published", [(70.0, 0.08), (136.0, 0.30), (193.0, 0.25)])]}))
    (tmp_path / "auto.json").write_text(json.dumps({"title": "H200 b", "rows": [
        _row("auto", [(20.0, 0.1), (27.0, 0.29), (34.0, 0.31), (40.0, 0.9)])]}))
    out = tmp_path / "both.json"
    result = _run("time_to_quality.py", "--merge", str(tmp_path / "pub.json"), str(tmp_path / "auto.json"),
                  "--json", str(out), tmp_path=tmp_path)
    both = json.loads(out.read_text())
    assert both["target_val_f1"] == 0.30  # the published row's best
    assert [r["time_to_target_s"] for r in both["rows"]] == [136.0, 34.0]  # first val at or above it
    assert both["ratio"] == 136.0 / 34.0
    assert "4.0x" in result.stdout


def test_time_to_quality_derives_the_published_time_from_its_measured_epochs(tmp_path: Path) -> None:
    """The derived row, per seed: that seed's published-fast epochs to the target times the published row's
    measured wall time per epoch (the mean gap between its epochs' val records, start-up excluded), beside
    auto's measured time per seed; means, standard deviations and runs; quality compared by the spread."""
    published = _row("published", [(70.0, 0.08), (136.0, 0.30), (193.0, 0.25)]) | {"val_epochs": [1, 2, 3], "seed": 1}
    fast = [_row("published-fast", [(20.0, 0.08), (28.0, 0.31), (36.0, 0.25), (44.0, 0.7), (52.0, 0.92)])
            | {"val_epochs": [1, 2, 3, 4, 5], "seed": 1, "test_f1": 0.90},
            _row("published-fast", [(20.0, 0.1), (28.0, 0.5), (36.0, 0.95)]) | {"val_epochs": [1, 2, 3], "seed": 2,
                                                                              "test_f1": 0.92}]
    auto = [_row("auto", [(20.0, 0.1), (27.0, 0.29), (34.0, 0.31), (40.0, 0.9)]) | {"val_epochs": [1, 2, 3, 4], "seed": 1,
                                                                                 "test_f1": 0.94},
            _row("auto", [(22.0, 0.2), (30.0, 0.93)]) | {"val_epochs": [1, 2], "seed": 2, "test_f1": 0.96}]
    (tmp_path / "rows.json").write_text(json.dumps({"title": "H100", "rows": [published, *fast, *auto]}))
    out = tmp_path / "derived.json"
    result = _run("time_to_quality.py", "--merge", str(tmp_path / "rows.json"), "--target", "0.9", "--json", str(out),
                  tmp_path=tmp_path)
    derived = json.loads(out.read_text())["derived"]
    assert derived["published_s_per_epoch"] == (193.0 - 70.0) / 2  # measured: two epoch gaps
    assert derived["epochs_to_target"] == [5, 3]
    assert derived["published_time_to_target_s"]["runs"] == [5 * 61.5, 3 * 61.5]
    assert derived["auto_time_to_target_s"]["runs"] == [40.0, 30.0]
    assert derived["ratio"] == (4 * 61.5) / 35.0 and derived["reached"] == {"published": 2, "auto": 2}
    quality = derived["quality"]["test_f1"]
    assert quality["published"]["mean"] == pytest.approx(0.91, abs=1e-12) and quality["auto"]["runs"] == [0.94, 0.96]
    # means 0.95 vs 0.91, each s = 0.0141: the difference is 2.83 standard errors of it
    assert quality["auto_vs_published"] == "outside the spread"
    # the cross-check compares the published row with the published-fast run of its own seed
    assert derived["cross_check_epochs"] == 3 and abs(derived["cross_check_max_f1_gap"] - 0.01) < 1e-12
    assert "derived" in result.stdout and "7.0x" in result.stdout and "± " in result.stdout


@pytest.mark.slow
def test_time_to_quality_runs_every_row_over_two_seeds_on_a_cpu(tmp_path: Path) -> None:
    """The CPU smoke run of the bench as a GPU session runs it (tiny preset, 12 studies, 2 seeds): every
    row really trains; with target 0 each run reaches it at its first val evaluation, so the derived time
    of each seed is exactly 1 epoch x the published row's measured time per epoch."""
    out = tmp_path / "ttq.json"
    result = _run("time_to_quality.py", "--device", "cpu", "--studies", "12", "--epochs", "1", "--fast-epochs", "1",
                  "--seeds", "2", "--target", "0", "--run-dir", str(tmp_path / "runs"),
                  "--json", str(out), tmp_path=tmp_path)
    data = json.loads(out.read_text())
    assert [(r["row"], r["seed"]) for r in data["rows"]] == [
        ("published", 9223), ("published-fast", 9223), ("published-fast", 9224), ("auto", 9223), ("auto", 9224)]
    assert all(r["curve"] and r["wall_s"] > 0 and r["test_bleu4"] is not None for r in data["rows"])
    derived = data["derived"]
    published = data["rows"][0]
    measured = published["curve"][0][0] / published["val_epochs"][0]  # one epoch: its time from the start
    assert derived["published_s_per_epoch"] == measured and derived["epochs_to_target"] == [1, 1]
    assert derived["published_time_to_target_s"]["runs"] == [measured, measured]
    assert derived["auto_time_to_target_s"]["runs"] == [r["curve"][0][0] for r in data["rows"][3:]]
    assert derived["ratio"] == measured / (sum(derived["auto_time_to_target_s"]["runs"]) / 2)
    assert set(derived["quality"]["test_f1"]) == {"published", "auto", "auto_vs_published"}
    assert "mean ± standard deviation (runs) over seeds" in result.stdout.replace("\n", " ")


def test_every_mutant_still_applies_to_the_tree() -> None:
    """bench/mutants.sh shows each named test failing on its mistake; a patch that no longer applies
    would show nothing. Each one applies (checked, not applied) and names a test that exists."""
    patches = sorted((ROOT / "bench" / "mutants").glob("*.patch"))
    assert len(patches) >= 8
    for patch in patches:
        header = dict(line[2:].split(": ", 1) for line in patch.read_text().splitlines()[:2])
        assert header["mark"] in ("cpu", "gpu"), patch.name
        test_file, _, name = header["test"].partition("::")
        assert (ROOT / test_file).is_file() and f"def {name}(" in (ROOT / test_file).read_text(), patch.name
        check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
        assert check.returncode == 0, f"{patch.name}: {check.stderr}"
