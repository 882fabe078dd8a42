"""Atomic writes, the one home: a file or a folder appears complete under its name, or not at all.

A file is written to a temporary sibling, flushed to disk, then renamed over its name; a folder is
filled under a hidden sibling and renamed into place. Both keep the mode open() or mkdir() would give.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 hides runs from colleagues


def write_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(f) into a temporary file beside `path`, flushed and synced, then renamed to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    write_file(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, final: Path) -> bool:
    """Atomically rename tmp to final; False (tmp removed) if final got filled meanwhile."""
    try:
        os.replace(tmp, final)  # POSIX rename: succeeds onto a missing or empty directory
        return True
    except OSError:
        if final.is_dir() and any(final.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> bool:
    """write(folder) into a hidden sibling of final, then rename it to final; False (nothing
    left behind) if final got filled meanwhile. On any error the partial folder is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same file system, so the final rename is atomic and a
    # half-written set is never visible under the real name. os.mkdir rather than
    # tempfile.mkdtemp, whose 0700 mode would survive the rename; the pid + random
    # suffix keeps racing processes apart.
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        return _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
