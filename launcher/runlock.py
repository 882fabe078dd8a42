"""One writer per run directory: an exclusive lock that dies with the process holding it.

A training command (new run or --keep-training) holds `<run>/.lock` from before its first write
until it exits. The lock is the kernel's (`flock`), not the file's existence: a process killed with
SIGKILL, or a machine that rebooted, leaves no stale lock behind, and the next --keep-training
takes it at once. The file's content only says who holds it (process, host, start time, command),
for the refusal a second writer gets. Reading commands (evaluate, report) take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from types import TracebackType

from r2gen.errors import ConfigError

LOCK_NAME = ".lock"


def holder_text(info: dict) -> str:
    """'process 4242 on gpu-node-3 since 2026-12-03 13:05:11 (r2gen-launch plain ...)' from a lock's content."""
    if not info:
        return "another process (it has not written its name yet)"
    command = f" ({info['command']})" if info.get("command") else ""
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}{command}"


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for this process, or raises ConfigError (exit 2)
    naming the process, host and start time that holds it. Creates the run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(f"--run-dir/--name: {self.run_dir} is being trained by {holder_text(holder)}; a run "
                              "has one writer at a time: wait for it to end, or stop it (its lock goes with it)") from None
        except OSError as err:  # a filesystem without locks: say so rather than train unguarded
            os.close(fd)
            raise ConfigError(f"--run-dir: cannot lock {self.path} ({err.strerror}); put runs on a filesystem "
                              "with file locks") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": f"{datetime.now():%Y-%m-%d %H:%M:%S}",
                "command": " ".join(["r2gen-launch", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def live_holder(run_dir: Path) -> str:
    """Who trains the run now (holder_text), or "" when no process on this host does: read from the lock
    file's content and the process's liveness; takes no lock (a reader must never block a writer)."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return ""
    try:
        info = _read(fd)
    finally:
        os.close(fd)
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return ""
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return ""
    except PermissionError:  # alive, another user's
        pass
    return holder_text(info)
