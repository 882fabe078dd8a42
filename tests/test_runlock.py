"""One writer per run directory: a second training command on a run is refused at once (exit 2,
naming the holder), a run killed with SIGKILL leaves no stale lock, reading commands stay allowed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from launcher.runlock import RunLock
from r2gen.errors import ConfigError
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from launcher.runlock import RunLock; RunLock(__import__('pathlib').Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)"
# 14 train studies in windows of 4: 4 steps per epoch; a resumable checkpoint after every step.
RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--beam-size", "1", "--val-every", "last",
       "--effective-batch", "4", "--batch-size", "2", "--save-every", "1", "--num-workers", "0"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONPATH": repo_pythonpath(),
            "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "300"}


def _holder(run: Path, tmp_path: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(tmp_path), stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_leaves_no_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _holder(run, tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            RunLock(run).acquire()
        message = str(info.value)
        assert f"process {holder.pid} on {socket.gethostname()} since " in message and str(run) in message
        assert "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock with the process
        holder.wait()
    with RunLock(run) as lock:  # taken at once, and it says who holds it now
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with RunLock(run):  # released on exit: taken again
        pass


def test_keep_training_on_a_run_that_trains_is_refused_and_evaluate_is_not(tmp_path: Path) -> None:
    """A resubmitted batch job's --keep-training while the old one still trains: refused at once
    (the old one's kill -9 and the continuation are tests/test_resume.py's, which pass through the lock)."""
    runs = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", *RUN, "--epochs", "50", "--run-dir", str(runs),
                              "--name", "r"], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    manifest = runs / "r" / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if manifest.is_file() and json.loads(manifest.read_text())["states"]:
            break
        time.sleep(0.1)
    try:
        assert first.poll() is None, first.communicate()[1][-2000:]
        second = CliRunner().invoke(app, [*RUN, "--run-dir", str(runs), "--name", "r", "--keep-training"])
        assert second.exit_code == 2, second.output
        lines = [line for line in second.output.splitlines() if line.strip()]
        assert len(lines) == 1 and f"process {first.pid} on {socket.gethostname()}" in " ".join(second.output.split())
        # Reading commands take no lock.
        evaluated = subprocess.run([sys.executable, "-m", "launcher.cli", "evaluate", "--checkpoint", str(runs / "r"),
                                    "--split", "val", "--beam-size", "1", "--num-workers", "0"], env=_env(tmp_path),
                                   capture_output=True, text=True, timeout=600)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert first.poll() is None  # it was refused while the first one still trained
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    with RunLock(runs / "r"):  # the killed run's lock went with it
        pass
    assert json.loads((runs / "r" / "versions.json").read_text())["torch"]
