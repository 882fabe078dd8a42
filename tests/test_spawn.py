"""Launch commands, checked by the launchers' own argument parsers, and running children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.registry import spec
from backends.spec import Topology
from backends.accelerate import ACCELERATE_LAUNCH
from backends.deepspeed import DEEPSPEED
from backends.plain import TORCHRUN
from launcher.spawn import WORKER_MODULE, launch_command, run_command
from r2gen.errors import ConfigError

MULTI = Topology(gpus_per_node=4, nodes=2, node_rank=1, master_addr="10.1.2.3", master_port=29611)


def test_torchrun_command() -> None:
    from torch.distributed.run import get_args_parser

    command = launch_command(spec("plain"), MULTI, ["--run-dir", "runs/x"])
    assert tuple(command[:3]) == TORCHRUN
    args = get_args_parser().parse_args(command[3:])
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "2", 1)
    assert (args.master_addr, args.master_port, args.module) == ("10.1.2.3", 29611, True)
    assert args.training_script == WORKER_MODULE and args.training_script_args == ["--run-dir", "runs/x"]


def test_accelerate_command(tmp_path: Path) -> None:
    from accelerate.commands.launch import launch_command_parser

    config = tmp_path / "run.yaml"
    command = launch_command(spec("accelerate"), MULTI, ["--run-dir", "runs/x"], engine_config=config)
    assert tuple(command[:3]) == ACCELERATE_LAUNCH
    args = launch_command_parser().parse_args(command[3:])
    assert args.config_file == str(config) and args.module
    assert args.training_script == WORKER_MODULE and args.training_script_args == ["--run-dir", "runs/x"]
    with pytest.raises(ConfigError, match="accelerate_configs"):
        launch_command(spec("accelerate"), MULTI, [])


def test_deepspeed_command(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import parse_args

    config = tmp_path / "run.json"
    command = launch_command(spec("deepspeed"), MULTI, ["--run-dir", "runs/x"], engine_config=config)
    assert tuple(command[:3]) == DEEPSPEED
    args = parse_args(command[3:])
    assert (args.num_nodes, args.num_gpus, args.node_rank, args.no_ssh) == (2, 4, 1, True)
    assert (args.master_addr, args.master_port, args.module, args.no_local_rank) == ("10.1.2.3", 29611, True, True)
    assert args.user_script == WORKER_MODULE
    assert args.user_args == ["--run-dir", "runs/x", "--deepspeed_config", str(config)]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    args = parse_args(launch_command(spec("deepspeed"), MULTI, [], engine_config=config, hostfile=hostfile)[3:])
    assert args.hostfile == str(hostfile) and not args.no_ssh
    with pytest.raises(ConfigError, match="--hostfile"):
        launch_command(spec("deepspeed"), MULTI, [], engine_config=config, hostfile=tmp_path / "missing")


def test_exit_code_and_output_of_the_child_reach_the_caller(capfd: pytest.CaptureFixture[str]) -> None:
    code = run_command([sys.executable, "-c", "import sys; print('from the child', flush=True); sys.exit(3)"])
    assert code == 3 and "from the child" in capfd.readouterr().out


@pytest.mark.parametrize("ignore_sigint", [False, True])
def test_ctrl_c_stops_the_launcher_and_its_workers(tmp_path: Path, ignore_sigint: bool) -> None:
    """Ctrl-C to r2gen-launch leaves no process behind, also when the children ignore SIGINT."""
    pid_file = tmp_path / "worker.pid"
    tree = ("import signal, subprocess, sys, time; "
            + ("signal.signal(signal.SIGINT, signal.SIG_IGN); " if ignore_sigint else "")
            + f"w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(600)")
    parent = ("import sys; sys.path.insert(0, %r); from launcher.spawn import run_command; "
              "sys.exit(run_command([sys.executable, '-c', %r], grace_s=1.0))") % (str(Path(__file__).parents[1]), tree)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "the worker never started"
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    deadline = time.time() + 10
    while _alive(worker):
        assert time.time() < deadline, "the worker outlived Ctrl-C"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, not just an unreaped zombie (orphans are reaped by whoever adopts them, maybe late)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_launch_json_round_trips_through_its_type(tmp_path: Path) -> None:
    """launch.json is written and read as launcher.launch_file.Launch: what the launcher writes is what
    every process reads, field for field; a file missing a field, or with one nobody reads, is refused."""
    import json
    import re

    from launcher.launch_file import Launch
    from r2gen.errors import ConfigError

    launch = Launch(backend="plain", device="cpu", precision="fp32", engine={}, engine_config=None,
                    config={"seed": 1}, annotation="a.json", image_dir="img", run_dir="runs/x", tokenizer="{}",
                    plan="{}", weights_source="random", resume="runs/x/checkpoints/step-1")
    path = tmp_path / "launch.json"
    launch.write(path)
    assert Launch.read(path) == launch
    data = json.loads(path.read_text())
    for broken, needle in (({k: v for k, v in data.items() if k != "plan"}, "lacks plan"),
                           ({**data, "extra": 1}, "has unknown field(s) extra")):
        path.write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=re.escape(f"--launch: {path} {needle}")):
            Launch.read(path)
