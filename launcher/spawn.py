"""Launch commands for the engines' own launchers, and running them.

`launch_command` is pure: torchrun for plain DDP, `accelerate launch --config_file` for Accelerate,
the `deepspeed` launcher with its JSON, each with the multi-node options of a Topology.
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

from launcher.engine_config import Topology
from r2gen.errors import ConfigError

WORKER_MODULE = "launcher.worker"
"""The module every launcher starts once per process: it runs the shared loop from launch.json."""

# The launchers' own entry points, run by this interpreter (as `torchrun`, `accelerate launch` and
# `deepspeed` do), so that a venv that is not on PATH still finds them.
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")
DEEPSPEED = (sys.executable, "-m", "deepspeed.launcher.runner")


def free_port() -> int:
    """A TCP port nobody listens on now, for a single host's rendezvous (not torchrun's fixed 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(backend: str, topology: Topology, worker_args: Sequence[str], engine_config: Path | None = None,
                   hostfile: Path | None = None) -> list[str]:
    """The command line that starts `topology.world_size` processes of the worker."""
    t = topology
    if backend in ("plain", "fp8"):
        return [*TORCHRUN, f"--nproc_per_node={t.gpus_per_node}", f"--nnodes={t.nodes}", f"--node_rank={t.node_rank}",
                f"--master_addr={t.master_addr}", f"--master_port={t.master_port}", "-m", WORKER_MODULE,
                *worker_args]
    if backend == "accelerate":
        if engine_config is None:
            raise ConfigError("accelerate launch needs the generated accelerate_configs/<run>.yaml")
        return [*ACCELERATE_LAUNCH, "--config_file", str(engine_config), "-m", WORKER_MODULE, *worker_args]
    if backend == "deepspeed":
        if engine_config is None:
            raise ConfigError("the deepspeed launcher needs the generated ds_configs/<run>.json")
        command = [*DEEPSPEED]
        if hostfile is not None:
            if not hostfile.is_file():
                raise ConfigError(f"--hostfile: {hostfile} does not exist")
            command += ["--hostfile", str(hostfile)]
        elif t.nodes > 1:
            # Without a hostfile every node is started by hand with its rank (no ssh from the launcher).
            command += ["--no_ssh", f"--node_rank={t.node_rank}"]
        # The worker reads LOCAL_RANK from its environment, as under torchrun: no --local_rank argument.
        command += [f"--num_nodes={t.nodes}", f"--num_gpus={t.gpus_per_node}", f"--master_addr={t.master_addr}",
                    f"--master_port={t.master_port}", "--no_local_rank", "--module", WORKER_MODULE, *worker_args,
                    "--deepspeed_config", str(engine_config)]
        return command
    raise ConfigError(f"--backend: no launcher for {backend!r}")


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
