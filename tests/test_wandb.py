"""--wandb with the real package in offline mode: the run's W&B files hold every numeric key of
metrics.jsonl and the plan as config; the API key comes from the environment only and is written
nowhere; bad W&B requests are refused before anything is written; no wandb without --wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from launcher.cli import app
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]
RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--beam-size", "1",
       "--num-workers", "0", "--log-every", "1"]
SECRET = "r2gen-test-secret-0123456789abcdef"


def _wandb_records(path: Path) -> Iterator:
    """The protobuf records of a .wandb file: a ':W&B' header, then LevelDB-log records (4-byte
    CRC, 2-byte length, 1-byte type: full, first, middle, last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):
            pending += payload
        elif kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": repo_pythonpath(), **env})


def test_offline_run_files_hold_the_logged_keys_and_the_plan_but_never_the_key(tmp_path: Path) -> None:
    result = _cli([*RUN, "--wandb", "--run-dir", str(tmp_path), "--name", "w"],
                  {"WANDB_API_KEY": SECRET, "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "w"
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for entry in logged:  # every numeric value of every record, at its step
        for key, value in entry.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert history[entry["step"]][key] == pytest.approx(value), key
    assert {"train/loss", "perf/samples_per_s", "system/cpu_pct", "val/BLEU_4"} <= set().union(*history.values())
    assert config["plan"]["backend"] == "plain" and config["train"]["preset"] == "tiny"
    assert (run / "wandb-id.txt").read_text().strip() in wandb_file.name
    # The key was in the environment of the run: it is in no file of the run and in no output.
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("args,env,needle", [
    (["--wandb", "--wandb-mode", "online"], {"WANDB_API_KEY": ""}, "--wandb-mode online: set WANDB_API_KEY"),
    (["--wandb", "--wandb-mode", "cloud"], {}, "--wandb-mode: unknown 'cloud'"),
    (["--wandb-project", "x"], {}, "--wandb-project: needs --wandb"),
])
def test_bad_wandb_requests_are_refused_before_anything_is_written(tmp_path: Path, monkeypatch, args, env,
                                                                   needle) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, [*RUN, *args, "--run-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not (tmp_path / "runs").exists()


BLOCK_WANDB = "import sys; sys.modules['wandb'] = None; from launcher.cli import main; sys.argv[0] = 'r2gen-launch'; main()"


def test_without_wandb_installed_training_runs_and_wandb_is_refused_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache")}
    plain = subprocess.run([sys.executable, "-c", BLOCK_WANDB, *RUN, "--epochs", "1", "--max-steps-per-epoch", "1",
                            "--val-every", "last", "--run-dir", str(tmp_path), "--name", "no-wandb"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    asked = subprocess.run([sys.executable, "-c", BLOCK_WANDB, *RUN, "--wandb", "--run-dir", str(tmp_path),
                            "--name", "wandb"], capture_output=True, text=True, timeout=600, env=env)
    assert asked.returncode == 2 and "--wandb: the wandb package is not installed" in asked.stderr + asked.stdout
    assert not (tmp_path / "wandb").exists()
