"""Launch commands for the engines' own launchers, and running them.

`launch_command` is pure: the engine's spec builds it (torchrun for plain and FP8, `accelerate
launch --config_file` for Accelerate, the `deepspeed` launcher with its JSON, each with the
multi-node options of a Topology) around the one worker module.
`run_command` is the edge: the children inherit stdout/stderr (their output reaches the user as
it is written), run in their own process group, and Ctrl-C or SIGTERM stops the whole group; the
launcher's exit code is returned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from backends.spec import EngineSpec, Topology

WORKER_MODULE = "launcher.worker"
"""The module every launcher starts once per process: it runs the shared loop from launch.json."""


def repo_env() -> dict[str, str]:
    """This process's environment with this repository first on PYTHONPATH: the environment of every
    child that runs its code (launchers, a study's runs, --seeds runs, the benches' rows)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def free_port() -> int:
    """A TCP port nobody listens on now, for a single host's rendezvous (not torchrun's fixed 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(engine: EngineSpec, topology: Topology, worker_args: Sequence[str],
                   engine_config: Path | None = None, hostfile: Path | None = None) -> list[str]:
    """The command line that starts `topology.world_size` processes of the worker with `engine`'s launcher."""
    return engine.launch_command(topology, WORKER_MODULE, worker_args, engine_config, hostfile)


def run_command(command: Sequence[str], env: dict[str, str] | None = None, grace_s: float = 60.0) -> int:
    """Run a launcher; its output streams through; Ctrl-C/SIGTERM stop every process it started.

    The signal is passed on to the launcher's process group (training processes finish their step
    and save a checkpoint, which for the full model takes seconds); processes still running `grace_s`
    later get SIGTERM, and SIGKILL after as long again (a child may ignore SIGINT, e.g. under
    nohup). Returns the launcher's exit code (130 after Ctrl-C, 143 after SIGTERM, as shells do).
    """
    import time

    child = subprocess.Popen(list(command), env=env, start_new_session=True, stdout=sys.stdout.fileno(),
                             stderr=sys.stderr.fileno())
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        _signal_group(child.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        escalation = [signal.SIGTERM, signal.SIGKILL]
        since = None
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if not received:
                    continue
                since = since or time.monotonic()
                if escalation and time.monotonic() - since > grace_s:
                    _signal_group(child.pid, escalation.pop(0))
                    since = time.monotonic()
            except BaseException:
                _signal_group(child.pid, signal.SIGKILL)
                raise
        if received:
            # The launcher may have exited while workers still shut down: make sure none is left.
            _signal_group(child.pid, signal.SIGKILL)
            return 128 + received[0]
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
