"""Checkpoints: state files written atomically (r2gen.atomic), read back weights-only; the loop's checkpoints.

The loop's checkpoints on the wall-time cadence and best.pt are written on a background thread
(`BackgroundWrites`): the loop copies the state to host memory (a snapshot: training goes on
changing the weights) and goes on training while the file is written and checksummed.

Read back weights-only (tensors, containers, plain values and numpy's RNG state): a foreign file's
pickled code never runs. A full disk while writing is one line (RunFailed, exit 1) naming the file,
the bytes needed and free, and the newest intact checkpoint to continue from. `CheckpointStore` is a
run's checkpoints/ folder; `LoopCheckpoints` is what the training loop saves there and resumes from.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from r2gen.atomic import write_file, write_json
from r2gen.errors import ConfigError, RunFailed
from r2gen.state import MONITOR, LoopState, rng_state, set_rng_state
from r2gen.units import GIB

if TYPE_CHECKING:  # annotations only: the launcher imports this module without the model's code
    from r2gen.config import TrainConfig
    from r2gen.data.tokenizer import Tokenizer
    from r2gen.engine import TrainingEngine


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    write_file(path, lambda f: torch.save(state, f))


class UnreadableCheckpoint(ConfigError):
    """Not a checkpoint this code wrote: not a torch file, truncated, or holding more than data."""


def _state_globals() -> list:
    """The only non-tensor types the states we read hold: numpy's RNG state (a uint32 array in a tuple),
    and the published R2Gen trainer's `monitor_best`, a numpy float where its metric gave one (a scalar
    from bytes and a dtype: data, no code; numpy 1 wrote it as numpy.core..., numpy 2 as numpy._core...)."""
    import numpy as np

    key = np.random.get_state()[1]  # the array's own pickle function and dtype class, whatever numpy's version
    scalar = np.float64(0).__reduce__()[0]
    return [key.__reduce__()[0], np.ndarray, np.dtype, type(key.dtype),
            *((scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")),
            *(type(np.dtype(kind)) for kind in ("f8", "f4"))]


def load_checkpoint(path: Path, map_location: Any = "cpu", allowed: Sequence[Any] = ()) -> dict[str, Any]:
    """A state written by save_checkpoint, read weights-only: a pickle that would import or call
    anything else (a foreign or doctored file) is refused before any of its code runs. `allowed`: more
    classes an engine's own states hold (rebuilt from their fields; their constructors never run)."""
    try:
        with torch.serialization.safe_globals([*_state_globals(), *allowed]), warnings.catch_warnings():
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
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


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

    def state_path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def save(self, state: dict[str, Any], step: int, epoch: int) -> Path:
        """A resumable state after optimizer step `step`; older ones beyond keep_last are removed."""
        path = self.state_path(step)
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
        path = self.best_path
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


def host_copy(value: Any) -> Any:
    """A snapshot of a nested state: every tensor copied to host memory (detached), containers rebuilt,
    plain values shared (they are not changed in place by training)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


class BackgroundWrites:
    """Checkpoint writes on one worker thread, in the order given; at most `max_pending` snapshots held
    (a further one waits for the oldest). A write's error (a full disk's RunFailed) is raised in the
    loop at the next submit or wait."""

    def __init__(self, max_pending: int = 2):
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, write: Any, *args: Any) -> Future:
        self._settle(keep=self.max_pending - 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        future = self._pool.submit(write, *args)
        self._pending.append(future)
        return future

    def wait(self) -> None:
        """Every write given so far is on disk (or its error raised)."""
        self._settle(keep=0)

    def _settle(self, keep: int) -> None:
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            self._pending.pop(0).result()

    def close(self) -> None:
        """Wait for the writes, then stop the thread (also after an error, which is raised)."""
        try:
            self.wait()
        finally:
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class LoopCheckpoints:
    """What the training loop keeps in a run's checkpoints/ (a CheckpointStore): resumable states of
    this moment (`save`; on the wall-time cadence: `save_if_due`), best.pt after a val improvement
    (`save_best`), and continuing from a saved state (`resume`). The cadence's states and best.pt are
    written in the background (`writing()` around the loop and the end waits for them); `save` itself,
    for a stop, a failure or the step cadence, returns once its state is on disk."""

    def __init__(self, run_dir: Path, backend: TrainingEngine, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, tokenizer: Tokenizer,
                 plan_json: str | None):
        self.store = CheckpointStore(run_dir / "checkpoints", cfg.keep_last)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.backend, self.model, self.optimizer, self.scheduler = backend, model, optimizer, scheduler
        self.cfg, self.tokenizer, self.plan_json = cfg, tokenizer, plan_json
        self.last_save = time.perf_counter()
        self.writes = BackgroundWrites()
        self._best_write: Future | None = None

    @contextmanager
    def writing(self, last: bool = False) -> Iterator[None]:
        """Around the loop (and, `last`, around what follows it): the wall-time cadence counts from the
        loop's start; an error inside waits for the background writes and is raised (a write's own
        error then stays unseen: the first is what stopped the run); after `last`, every write is
        finished and its error raised."""
        if not last:
            self.last_save = time.perf_counter()
        try:
            yield
        except BaseException:
            try:
                self.writes.close()
            except Exception:
                pass
            raise
        if last:
            self.writes.close()

    def best_written(self) -> None:
        """best.pt, given to the background writer last, is on disk (before it is read back)."""
        if self._best_write is not None:
            self._best_write.result()

    def resume(self, path: Path) -> LoopState:
        """Model, optimizer, scheduler, engine and random states as saved at `path` (a state file, or an
        engine's checkpoint folder with our loop.pt), metrics.jsonl cut back to that moment; the
        LoopState to continue from."""
        backend = self.backend
        try:  # weights-only: a file that is not our own state is refused before any of its code runs
            state = load_checkpoint(path / "loop.pt" if path.is_dir() else path)
        except UnreadableCheckpoint as exc:
            raise ConfigError(f"--keep-training: {exc}") from None
        if path.is_dir():  # an engine checkpoint (DeepSpeed, Accelerate): weights and optimizer from it
            backend.load_engine(self.model, path)
        else:
            backend.unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        backend.load_state_dict(state["backend"])
        loop = LoopState(**state["loop"])
        if len(state["rng"]) != backend.world_size:
            raise ConfigError(f"--keep-training: {path} was saved by {len(state['rng'])} process(es), "
                              f"this run has {backend.world_size}")
        set_rng_state(state["rng"][backend.rank])
        if backend.is_main and self.metrics_path.is_file():
            with self.metrics_path.open("r+b") as f:  # records after the save happen again
                f.truncate(loop.metrics_bytes)
        return loop

    def save(self, loop: LoopState, background: bool = False) -> Path | None:
        """A resumable checkpoint of this moment. Rank 0 writes it; an engine with its own checkpoint
        (DeepSpeed) has every process write its part first (then no write is in the background).
        `background`: return once the state is copied to host memory; the path it will have."""
        backend, store, model = self.backend, self.store, self.model
        if backend.saves_engine:
            staged = store.staging(loop.steps)
            needed = store.needed_bytes(model_checkpoint_bytes(backend.unwrap(model), self.cfg.amsgrad,
                                                               engine_saves=True))
            if backend.is_main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            backend.barrier()
            with store.writing(staged, needed, discard=staged):  # a full disk: one line, the staged part removed
                backend.save_engine(model, staged)
            backend.barrier()
        rngs = backend.gather(rng_state())  # each process's own: they drew differently (dropout on its rows)
        if not backend.is_main:
            return None
        loop.metrics_bytes = self.metrics_path.stat().st_size if self.metrics_path.is_file() else 0
        state = self.state(loop, rngs)
        if backend.saves_engine:
            with store.writing(staged / "loop.pt", tensor_bytes(state), discard=staged):
                save_checkpoint(state, staged / "loop.pt")
            return store.commit(staged, loop.steps, loop.epoch)
        if background:
            self.writes.submit(store.save, host_copy(state), loop.steps, loop.epoch)
            return store.state_path(loop.steps)
        self.writes.wait()  # the states in their order, each entered in the manifest after the one before
        return store.save(state, loop.steps, loop.epoch)

    def save_if_due(self, loop: LoopState, final: bool) -> None:
        """A resumable state on the wall-time cadence (checkpoint_every_min; 0: every call), and always
        when `final` (the end, an early stop); rank 0's clock decides for every process (an engine's
        checkpoint is written by all)."""
        every = self.cfg.checkpoint_every_min
        if self.backend.broadcast_flag(final or not every or time.perf_counter() - self.last_save >= 60 * every):
            self.save(loop, background=True)
            self.last_save = time.perf_counter()

    def save_best(self, loop: LoopState, epoch: int) -> Path:
        """best.pt of this moment, written in the background (`best_written` waits for it)."""
        self._best_write = self.writes.submit(self.store.save_best, host_copy(self.weights(loop)), epoch)
        return self.store.best_path

    def weights(self, loop: LoopState) -> dict:
        """best.pt: what `evaluate` and `generate` read (weights, configuration, vocabulary), no optimizer."""
        return {"model": self.backend.unwrap(self.model).state_dict(), "config": self.cfg.to_dict(),
                "tokenizer": self.tokenizer.to_json(), "plan": self.plan_json, "epoch": loop.epoch - 1,
                "step": loop.steps, "monitor": f"val/{MONITOR}", "best_score": loop.best_score}

    def state(self, loop: LoopState, rngs: list[dict]) -> dict:
        """A resumable state: the full weights always (best.pt and `evaluate` read any engine's checkpoint
        the same way); the optimizer only where the engine's own checkpoint does not hold it."""
        backend = self.backend
        return {"model": backend.unwrap(self.model).state_dict(),
                "optimizer": None if backend.saves_engine else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "backend": backend.state_dict(),
                "config": self.cfg.to_dict(), "tokenizer": self.tokenizer.to_json(), "loop": asdict(loop),
                "rng": rngs, "plan": self.plan_json,
                "epoch": loop.epoch - 1 if loop.position == 0 else loop.epoch, "step": loop.steps,
                "monitor": f"val/{MONITOR}"}
