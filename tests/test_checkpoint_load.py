"""Checkpoints are read weights-only: our own states (a real run's step files and best.pt) load,
evaluate and resume; a file that is not one (random bytes, text, a pickle whose code would run)
is refused in one line naming it (exit 2), and its code never runs. A real tiny-preset checkpoint's
size lies within the plan's arithmetic estimate."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.checkpoint import CheckpointStore, UnreadableCheckpoint, checkpoint_bytes, load_checkpoint, sha256_of
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]
# 2 optimizer steps, a resumable state after each, val and test at the end (best.pt).
RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--max-steps-per-epoch", "2",
       "--beam-size", "1", "--val-every", "last", "--effective-batch", "4", "--batch-size", "2", "--save-every", "1",
       "--num-workers", "0"]


@pytest.fixture(scope="module")
def own(module_scratch) -> Path:
    """A real run's directory (made by the CLI, as a user would)."""
    tmp = module_scratch("own")
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp / "cache"), "COLUMNS": "400"}
    result = subprocess.run([sys.executable, "-m", "launcher.cli", *RUN, "--run-dir", str(tmp / "runs"),
                             "--name", "own"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs" / "own"


def _copy(run: Path, to: Path) -> Path:
    """A copy of a run whose checkpoints are hard links (never rewritten in place: saves are atomic)."""
    shutil.copytree(run, to, copy_function=lambda s, d: os.link(s, d) if s.endswith(".pt") else shutil.copy2(s, d))
    return to


class RunsCode:
    """Unpickling this calls os.system: the marker file appears if the code ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _foreign(kind: str, path: Path, marker: Path) -> Path:
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("model: weights\nstep: 3\n")
    elif kind == "pickle that runs code":
        path.write_bytes(pickle.dumps({"model": {}, "config": {}, "tokenizer": RunsCode(marker)}, protocol=2))
    elif kind == "torch file that runs code":
        torch.save({"model": {"w": torch.ones(2)}, "config": {}, "tokenizer": RunsCode(marker)}, path)
    elif kind == "legacy torch file that runs code":
        torch.save({"model": {}, "loop": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    return path


FOREIGN = ["random bytes", "text", "pickle that runs code", "torch file that runs code",
           "legacy torch file that runs code"]


def test_the_code_would_run_under_a_full_unpickler(tmp_path: Path) -> None:
    """The test's own premise: these files do run code when read without weights_only."""
    marker = tmp_path / "ran"
    torch.load(_foreign("torch file that runs code", tmp_path / "f.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_foreign_file_is_refused_and_its_code_never_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _foreign(kind, tmp_path / "foreign.pt", marker)
    with pytest.raises(UnreadableCheckpoint) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "not a readable checkpoint" in message and "\n" not in message
    if "code" in kind:
        assert "posix.system" in message or "os.system" in message, message  # says what it refused to load
    assert not marker.exists()


@pytest.mark.parametrize("kind", FOREIGN)
def test_evaluate_refuses_a_foreign_checkpoint_in_one_line(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _foreign(kind, tmp_path / "foreign.pt", marker)
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(path), "--device", "cpu"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: --checkpoint:") and str(path) in lines[0], result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_our_own_states_load_weights_only(own: Path) -> None:
    folder = own / "checkpoints"
    manifest = CheckpointStore(folder).manifest()
    assert [e["step"] for e in manifest["states"]] == [1, 2] and manifest["best"]["step"] == 2
    for name in ("step-00000001.pt", "step-00000002.pt", "best.pt"):
        state = load_checkpoint(folder / name)
        full = torch.load(folder / name, weights_only=False)  # our own file: the reference reading
        assert state.keys() == full.keys()
        assert all(torch.equal(state["model"][k], v) for k, v in full["model"].items())
        for key in ("config", "tokenizer", "plan", "step", "epoch"):
            assert state[key] == full[key], key
        if name == "best.pt":  # weights only: what evaluate reads
            assert "optimizer" not in state and "rng" not in state
            continue
        for key in ("loop", "scheduler", "backend"):
            assert state[key] == full[key], key
        kind, keys, *rest = state["rng"][0]["numpy"]
        assert kind == "MT19937" and keys.dtype == np.uint32 and np.array_equal(keys, full["rng"][0]["numpy"][1])
        assert tuple(rest) == tuple(full["rng"][0]["numpy"][2:])
        assert state["rng"][0]["python"] == full["rng"][0]["python"]
        assert torch.equal(state["rng"][0]["torch"], full["rng"][0]["torch"])
        assert state["optimizer"]["param_groups"] == full["optimizer"]["param_groups"]


def test_our_best_checkpoint_evaluates(own: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(own / "checkpoints" / "best.pt"), "--device",
                                      "cpu", "--beam", "1", "--num-workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["step"] == 2


def test_keep_training_continues_from_our_own_step_file(own: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    run = _copy(own, tmp_path / "runs" / "own")
    result = CliRunner().invoke(app, ["plain", "--keep-training", "--name", "own", "--run-dir", str(run.parent),
                                      "--epochs", "2"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "step-00000002.pt" in "".join(result.output.split())  # continuing ... from it (the console wraps)
    newest, _ = CheckpointStore(run / "checkpoints").newest_intact()
    state = load_checkpoint(newest)
    assert state["step"] == 4 and state["loop"]["epoch"] == 3  # epoch 2's two steps, after the saved epoch 1


def test_keep_training_refuses_a_doctored_checkpoint_in_one_line(own: Path, tmp_path: Path) -> None:
    """A newest checkpoint that matches its manifest entry but holds code (someone rewrote both)."""
    run = _copy(own, tmp_path / "runs" / "own")
    marker = tmp_path / "ran"
    newest = run / "checkpoints" / "step-00000002.pt"
    newest.unlink()  # a hard link: the original run keeps its own file
    _foreign("torch file that runs code", newest, marker)
    manifest_path = run / "checkpoints" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["states"][-1].update(bytes=newest.stat().st_size, sha256=sha256_of(newest))
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["plain", "--keep-training", "--name", "own", "--run-dir", str(run.parent)])
    assert result.exit_code == 2, result.output[-3000:]
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --keep-training:") and str(newest) in lines[-1], result.output[-3000:]
    assert "not a readable checkpoint" in lines[-1] and "Traceback" not in result.output
    assert not marker.exists()


def test_a_real_checkpoint_lies_within_the_arithmetic_estimate(own: Path) -> None:
    """fp32 weights and buffers + 3 AMSGrad states per parameter; the rest (config, vocabulary, RNG
    states, zip records) under the estimate's 1 MiB."""
    path = own / "checkpoints" / "step-00000002.pt"
    state = load_checkpoint(path)
    parameters = sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values())
    buffers = sum(t.numel() for t in state["model"].values()) - parameters
    assert parameters > 1_000_000 and buffers > 0
    tensors = 4 * (parameters + buffers) + 3 * 4 * parameters
    size = path.stat().st_size
    estimate = checkpoint_bytes(parameters, buffers)
    assert tensors <= size <= estimate < size + (1 << 20), (tensors, size, estimate)
