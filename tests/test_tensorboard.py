"""--tensorboard with the real package: <run>/tb holds every numeric key of metrics.jsonl as a scalar
at the same steps with the same values (as float32), time/unix_s as each event's wall time, and the
plan as text, read back with TensorBoard's own reader; without the package, --tensorboard is refused
before anything is written and training without it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from child_env import repo_pythonpath
from launcher.cli import app
from r2gen.config import TrainConfig, preset

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from r2gen.tensorboard_log import WALL_TIME_KEY, TensorBoardSink  # noqa: E402

RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--beam-size", "1",
       "--num-workers", "0", "--log-every", "1"]
BLOCK_TENSORBOARD = ("import sys; sys.modules['tensorboard'] = None; from launcher.cli import main; "
                     "sys.argv[0] = 'r2gen-launch'; main()")
FLOAT32_EPS = 2.0 ** -23


def _events(tb: Path) -> EventAccumulator:
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    events.Reload()
    return events


def _logged(records: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """What TensorBoard should hold: each numeric key's (step, value, wall time), in the records' order."""
    expected: dict[str, list[tuple[int, float, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", WALL_TIME_KEY) and isinstance(value, (int, float)):
                expected.setdefault(key, []).append((record["step"], float(value), record[WALL_TIME_KEY]))
    return expected


def _assert_same(events: EventAccumulator, expected: dict[str, list[tuple[int, float, float]]]) -> None:
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
        assert [(s, w) for s, _, w in got] == [(s, w) for s, _, w in points], tag
        for (_, value, _), (_, want, _) in zip(got, points):
            assert abs(value - want) <= FLOAT32_EPS * abs(want), (tag, value, want)


def _config_text(events: EventAccumulator) -> str:
    (tag,) = [t for t in events.Tags()["tensors"] if t.startswith("config")]
    return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def test_the_sink_writes_numbers_at_their_steps_and_the_config_as_text(tmp_path: Path) -> None:
    records = [
        {"step": 1, "epoch": 1, "train/loss": 3.7035810947418213, "perf/samples_per_s": 55.75, WALL_TIME_KEY: 1e9 + 0.5},
        {"step": 1, "epoch": 1, "train/samples": 14, "oom/gave_up": True, WALL_TIME_KEY: 1e9 + 1.25},
        {"step": 7, "val/BLEU_4": 1.0400731698658604e-09, "val/METEOR": None, "note": "text", WALL_TIME_KEY: 1e9 + 9},
    ]
    sink = TensorBoardSink(tmp_path, {"train": {"preset": "tiny"}, "plan": {"backend": "plain"}})
    for record in records:
        sink.log(record)
    events = _events(tmp_path / "tb")  # flushed per record: readable before close, as after a kill
    sink.close()
    _assert_same(events, _logged(records))
    assert events.Scalars("oom/gave_up")[0].value == 1.0
    assert json.loads("\n".join(line[4:] for line in _config_text(events).splitlines()))["plan"]["backend"] == "plain"


def test_a_cli_run_writes_every_numeric_key_of_metrics_jsonl_to_tb(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "launcher.cli", *RUN, "--tensorboard", "--run-dir", str(tmp_path),
                             "--name", "tb"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "tb"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = _logged(records)
    assert {"train/loss", "perf/samples_per_s", "system/cpu_pct", "val/BLEU_4", "test/BLEU_4"} <= set(expected)
    events = _events(run / "tb")
    _assert_same(events, expected)
    assert '"backend": "plain"' in _config_text(events) and '"tensorboard": true' in _config_text(events)
    assert json.loads((run / "config.json").read_text())["train"]["tensorboard"] is True


def test_without_tensorboard_installed_training_runs_and_tensorboard_is_refused_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    plain = subprocess.run([sys.executable, "-c", BLOCK_TENSORBOARD, *RUN, "--max-steps-per-epoch", "1",
                            "--val-every", "last", "--run-dir", str(tmp_path), "--name", "no-tb"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not (tmp_path / "no-tb" / "tb").exists()
    asked = subprocess.run([sys.executable, "-c", BLOCK_TENSORBOARD, *RUN, "--tensorboard", "--run-dir",
                            str(tmp_path / "runs")], capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in (asked.stdout + asked.stderr).splitlines() if line.strip()]
    assert asked.returncode == 2, asked.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: --tensorboard:") and "pip install tensorboard" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["plain", "accelerate", "deepspeed", "fp8", "auto"])
def test_every_training_command_offers_tensorboard(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--tensorboard" in result.output and "--no-tensorboard" in result.output


def test_configs_from_before_tensorboard_load_with_it_off() -> None:
    stored = preset("tiny").to_dict()
    del stored["tensorboard"]
    assert TrainConfig.from_dict(stored).tensorboard is False
    assert TrainConfig.from_dict(preset("tiny").replace(tensorboard=True).to_dict()).tensorboard is True
