"""The PYTHONPATH a test's child process (`python -m launcher.cli ...`) runs with: this checkout first,
then the caller's own (on the GPU host the wheels carried in, pydantic among them, come from it); and
`run_cli`, such a child run to its end with its own cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A child CLI's environment: this checkout's code, the data cache under `tmp`, and `extra`."""
    return {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp / "cache"), **extra}


def run_cli(args: list[str], tmp: Path, **extra: str) -> subprocess.CompletedProcess:
    """`python -m launcher.cli ARGS` to its end (10 minutes at most), its output captured as text."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, timeout=600,
                          env=cli_env(tmp, **extra))
