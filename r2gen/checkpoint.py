"""Checkpoint files written atomically: a temporary file in the same folder, flushed, then renamed.

Read back weights-only (tensors, containers, plain values and numpy's RNG state): a foreign file's
pickled code never runs. A full disk while writing is one line (RunFailed, exit 1) naming the file,
the bytes needed and free, and the newest intact checkpoint to continue from.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from r2gen.errors import ConfigError, RunFailed


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


class UnreadableCheckpoint(ConfigError):
    """Not a checkpoint this code wrote: not a torch file, truncated, or holding more than data."""


def _state_globals() -> list:
    """The only non-tensor types our states hold: numpy's RNG state (a uint32 array in a tuple)."""
    import numpy as np

    key = np.random.get_state()[1]  # the array's own pickle function and dtype class, whatever numpy's version
    return [key.__reduce__()[0], np.ndarray, np.dtype, type(key.dtype)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A state written by save_checkpoint, read weights-only: a pickle that would import or call
    anything else (a foreign or doctored file) is refused before any of its code runs."""
    try:
        with torch.serialization.safe_globals(_state_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on a foreign pickle's protocol: the refusal says it
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, foreign, not a torch file at all, or code in the pickle
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the import it refused
        why = (f"it would load {refused.group(1)}, and only tensors and plain data are read" if refused
               else type(exc).__name__)
        raise UnreadableCheckpoint(f"{path} is not a readable checkpoint ({why})") from None


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nested state (what torch.save writes, less a small overhead)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def is_disk_full(exc: BaseException, folder: Path, needed: int) -> bool:
    """Whether a failed write ran out of space: an OSError (itself, or what it was raised from) with
    ENOSPC, EDQUOT or EFBIG, or a writer's error quoting the OS's text for them (safetensors: "No
    space left on device (os error 28)"); or torch's zip writer failing (its RuntimeError carries no
    errno: "[enforce fail at inline_container.cc] unexpected pos") while the disk holds less than
    `needed` bytes."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(os.strerror(code) in str(seen) for code in DISK_FULL_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    zip_writer = isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos"))
    return zip_writer and free_bytes(folder) < needed


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def checkpoint_bytes(parameters: int, buffers: int = 0, optimizer_states: int = 3, weight_copies: int = 1,
                     overhead_bytes: int = 1 << 20) -> int:
    """One resumable state's bytes, all fp32: the weights and buffers (BatchNorm statistics, the
    positional table) `weight_copies` times (2 where an engine writes its own checkpoint beside
    loop.pt), `optimizer_states` tensors per parameter (Adam with AMSGrad, as R2Gen: exp_avg,
    exp_avg_sq, max_exp_avg_sq; 2 without AMSGrad), and the rest (configuration, vocabulary, RNG
    states, zip records) within `overhead_bytes`."""
    return 4 * ((parameters + buffers) * weight_copies + parameters * optimizer_states) + overhead_bytes


def model_checkpoint_bytes(model: torch.nn.Module, amsgrad: bool, engine_saves: bool) -> int:
    """checkpoint_bytes for this model: AMSGrad keeps 3 states per parameter (Adam 2); an engine that
    writes its own checkpoint (DeepSpeed) stores the weights twice (its files and loop.pt)."""
    return checkpoint_bytes(sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers()),
                            optimizer_states=3 if amsgrad else 2, weight_copies=2 if engine_saves else 1)


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
    `best.pt` (weights only, of the best validation score), and manifest.json listing each with its size and SHA-256.

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
        path = self.folder / f"step-{step:08d}"
        if path.exists():
            shutil.rmtree(path)
        os.replace(staged, path)
        with self.writing(self.folder / MANIFEST, self._manifest_bytes(), discard=path):  # not entered: never trusted
            self._enter(self._entry(path, step=step, epoch=epoch))
        return path

    def save(self, state: dict[str, Any], step: int, epoch: int) -> Path:
        """A resumable state after optimizer step `step`; older ones beyond keep_last are removed."""
        path = self.folder / f"step-{step:08d}.pt"
        with self.writing(path, self.needed_bytes(tensor_bytes(state))):
            save_checkpoint(state, path)
            try:
                self._enter(self._entry(path, step=step, epoch=epoch))
            except BaseException:  # not in the manifest, so never trusted; and its space is needed again
                path.unlink(missing_ok=True)
                raise
        return path

    def _manifest_bytes(self) -> int:
        """About what the next manifest needs: the current one and a page (a new entry is smaller)."""
        path = self.folder / MANIFEST
        return (path.stat().st_size if path.is_file() else 0) + 4096

    def needed_bytes(self, estimate: int) -> int:
        """Bytes the next state needs: its tensors' (`estimate`), or the previous state's size if larger."""
        states = self.manifest()["states"]
        last = states[-1] if states else {}
        previous = sum(f["bytes"] for f in last["files"].values()) if "files" in last else last.get("bytes", 0)
        return max(estimate, previous)

    @contextmanager
    def writing(self, path: Path, needed: int, discard: Path | None = None) -> Iterator[None]:
        """Around a write of `path` (`needed` bytes): a full disk becomes RunFailed, one line saying what
        was being written, the bytes needed and free, which checkpoint is intact and how to continue.
        `discard`: what was partly written (a folder), removed on any failure (a file's temporary
        removes itself)."""
        try:
            yield
        except Exception as exc:  # OSError, torch's RuntimeError, an engine's own (SafetensorError)
            if discard is not None and discard.is_dir():
                shutil.rmtree(discard, ignore_errors=True)
            elif discard is not None:
                discard.unlink(missing_ok=True)
            if not is_disk_full(exc, path.parent, needed):
                raise
            raise RunFailed(self.disk_full_message(path, needed)) from exc

    def disk_full_message(self, path: Path, needed: int) -> str:
        free = free_bytes(path.parent)
        newest, _ = self.newest_intact()
        entry = next((e for e in self.manifest()["states"] if newest is not None and e["file"] == newest.name), None)
        room = (f"free at least {_size(needed - free)} there" if needed > free
                else "free space there (or raise the quota)")
        then = (f"checkpoint {entry['step']} ({newest}) is intact: {room}, then run the same command with "
                "--keep-training" if entry else f"no checkpoint was saved yet: {room} and start the run again")
        return (f"disk full: writing {path} needs {needed:,} bytes ({_size(needed)}), {free:,} bytes ({_size(free)}) "
                f"are free; {then}")

    def _enter(self, entry: dict[str, Any]) -> None:
        manifest = self.manifest()
        states = [e for e in manifest["states"] if e["file"] != entry["file"]] + [entry]
        states.sort(key=lambda e: e["step"])
        dropped, manifest["states"] = states[:-self.keep_last], states[-self.keep_last:]
        write_json(self.folder / MANIFEST, manifest)  # pruned only once the new state is listed
        for old in dropped:
            path = self.folder / old["file"]
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def save_best(self, state: dict[str, Any], epoch: int) -> Path:
        """`best.pt`: the weights after a val improvement (with the configuration and vocabulary that
        `evaluate` reads, no optimizer: a third of a resumable state), atomically, in the manifest."""
        path = self.folder / "best.pt"
        with self.writing(path, tensor_bytes(state)):
            save_checkpoint(state, path)
        manifest = self.manifest()
        manifest["best"] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path),
                            "step": state.get("step"), "epoch": epoch}
        with self.writing(self.folder / MANIFEST, self._manifest_bytes()):
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
