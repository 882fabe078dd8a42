"""Checkpoint files written atomically: a temporary file in the same folder, flushed, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 hides runs from colleagues


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # Checkpoints hold config dicts and optimizer state besides tensors; they are our own files.
    return torch.load(path, map_location=map_location, weights_only=False)


def write_text(path: Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


MANIFEST = "manifest.json"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    """A run's checkpoints/ folder: resumable states `step-<step>.pt` (or, for an engine that writes
    its own checkpoint, a folder `step-<step>/` with it and our `loop.pt`; the newest `keep_last` kept),
    `best.pt` (best validation score), and manifest.json listing each with its size and SHA-256.

    Every file is written atomically and entered in the manifest only once complete; the manifest
    itself is replaced atomically. `newest_intact` returns the newest state whose file still matches
    its manifest entry, so a truncated or corrupted newest checkpoint falls back to the one before.
    """

    def __init__(self, folder: Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.folder, self.keep_last = folder, keep_last

    def manifest(self) -> dict[str, Any]:
        path = self.folder / MANIFEST
        if not path.is_file():
            return {"states": [], "best": None}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"states": [], "best": None}

    def _entry(self, path: Path, **info: Any) -> dict[str, Any]:
        if path.is_dir():  # an engine's own checkpoint (DeepSpeed: a file per process) with our loop.pt
            files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": sha256_of(f)}
                     for f in sorted(path.rglob("*")) if f.is_file()}
            return {"file": path.name, "files": files, **info}
        return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path), **info}

    def _intact(self, entry: dict[str, Any]) -> bool:
        path = self.folder / entry["file"]
        if "files" in entry:
            return path.is_dir() and all(
                (path / name).is_file() and (path / name).stat().st_size == f["bytes"]
                and sha256_of(path / name) == f["sha256"] for name, f in entry["files"].items())
        return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_of(path) == entry["sha256"]

    def staging(self, step: int) -> Path:
        """The folder an engine writes a checkpoint into before `commit` (the same name on every process)."""
        return self.folder / f".step-{step:08d}.tmp"

    def commit(self, staged: Path, step: int, epoch: int) -> Path:
        """A staged engine checkpoint becomes `step-<step>/`, entered in the manifest with every file's checksum."""
        import shutil

        path = self.folder / f"step-{step:08d}"
        if path.exists():
            shutil.rmtree(path)
        os.replace(staged, path)
        self._enter(self._entry(path, step=step, epoch=epoch))
        return path

    def save(self, state: dict[str, Any], step: int, epoch: int) -> Path:
        """A resumable state after optimizer step `step`; older ones beyond keep_last are removed."""
        path = self.folder / f"step-{step:08d}.pt"
        save_checkpoint(state, path)
        self._enter(self._entry(path, step=step, epoch=epoch))
        return path

    def _enter(self, entry: dict[str, Any]) -> None:
        import shutil

        manifest = self.manifest()
        states = [e for e in manifest["states"] if e["file"] != entry["file"]] + [entry]
        states.sort(key=lambda e: e["step"])
        dropped, manifest["states"] = states[:-self.keep_last], states[-self.keep_last:]
        write_json(self.folder / MANIFEST, manifest)
        for old in dropped:
            path = self.folder / old["file"]
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def mark_best(self, saved: Path, epoch: int) -> Path:
        """`best.pt` becomes the state just saved at `saved` (a step file, or a step folder's loop.pt):
        a hard link, so the state is neither serialized nor hashed a second time, and it outlives
        the step's pruning."""
        import shutil

        manifest = self.manifest()
        entry = next(e for e in manifest["states"] if e["file"] == saved.name)
        source, facts = (saved / "loop.pt", entry["files"]["loop.pt"]) if "files" in entry else (saved, entry)
        path, staged = self.folder / "best.pt", self.folder / ".best.pt.tmp"
        staged.unlink(missing_ok=True)
        try:
            os.link(source, staged)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(source, staged)
        os.replace(staged, path)
        manifest["best"] = {"file": path.name, "bytes": facts["bytes"], "sha256": facts["sha256"],
                            "step": entry["step"], "epoch": epoch}
        write_json(self.folder / MANIFEST, manifest)
        return path

    def newest_intact(self) -> tuple[Path | None, list[str]]:
        """(the newest state matching its manifest entry, or None; a warning per newer one skipped)."""
        warnings = []
        for entry in reversed(self.manifest()["states"]):
            path = self.folder / entry["file"]
            if not path.exists():
                warnings.append(f"{path} is missing")
            elif not self._intact(entry):
                warnings.append(f"{path} is truncated or corrupt (size or SHA-256 differs from the manifest)")
            else:
                return path, warnings
        return None, warnings
