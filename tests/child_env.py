"""The PYTHONPATH a test's child process (`python -m launcher.cli ...`) runs with: this checkout first,
then the caller's own (on the GPU host the wheels carried in, pydantic among them, come from it)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
