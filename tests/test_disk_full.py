"""A full disk during a checkpoint, for real: the run directory on a small tmpfs in a private mount
namespace (unshare), sized so that the first checkpoint fits and the second does not. The run
exits 1 with one line (the file, the bytes needed and free, the intact checkpoint, --keep-training),
no traceback, the earlier checkpoint intact and no temporary left; once space is freed,
--keep-training continues and finishes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from child_env import repo_pythonpath
from r2gen.checkpoint import checkpoint_bytes

ROOT = Path(__file__).resolve().parents[1]
# 2 optimizer steps, a resumable state after each, only the newest kept: step 1 fits, step 2 does not
# (the filler leaves about half a checkpoint); without the filler the whole run fits.
RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--epochs", "1", "--max-steps-per-epoch", "2",
       "--beam-size", "1", "--val-every", "last", "--effective-batch", "4", "--batch-size", "2", "--save-every", "1",
       "--keep-last", "1", "--num-workers", "0"]
# Inside the namespace: the store's own view of the folder (what --keep-training will trust).
INSPECT = """
import json, os, sys
from pathlib import Path
from r2gen.checkpoint import CheckpointStore, free_bytes
folder = Path(sys.argv[1])
newest, warnings = CheckpointStore(folder).newest_intact()
json.dump({"newest": newest.name if newest else None, "warnings": warnings, "files": sorted(os.listdir(folder)),
           "manifest": CheckpointStore(folder).manifest(), "free": free_bytes(folder)}, open(sys.argv[2], "w"))
"""


def _namespace_refused(mount: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(mount))}"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return f"a private mount namespace with a tmpfs is refused here: {probe.stderr.strip()[:200]}"
    return None


def _checkpoint_estimate() -> int:
    """The tiny preset's checkpoint on the embedded 20-study set, from its model (vocabulary included)."""
    from backends.plain import PlainBackend
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.synth import default_dataset
    from r2gen.build import prepare

    cfg = preset("tiny").replace(studies=20)
    prep = prepare(cfg, PlainBackend("cpu"), load_annotation(default_dataset(studies=20)), None)
    parameters = sum(p.numel() for p in prep.model.parameters())
    return checkpoint_bytes(parameters, sum(b.numel() for b in prep.model.buffers()))


@pytest.mark.slow
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_keep_training_finishes(tmp_path: Path) -> None:
    mount, logs = tmp_path / "disk", tmp_path / "logs"
    if reason := _namespace_refused(mount):
        pytest.skip(reason)
    logs.mkdir()
    each = _checkpoint_estimate()  # >= the real file (tests/test_checkpoint_load.py bounds it)
    size = int(2.6 * each)
    filler = size - int(1.5 * each)
    run = mount / "runs" / "full"
    # PATH of python alone for the runs: no java, so METEOR (a JVM start per evaluation) is n/a.
    cli = "PATH=" + " ".join(shlex.quote(a) for a in [str(Path(sys.executable).parent), sys.executable, "-m",
                                                      "launcher.cli", *RUN, "--run-dir", str(mount / "runs"),
                                                      "--name", "full"])
    inspect = f"{shlex.quote(sys.executable)} -c {shlex.quote(INSPECT)} {shlex.quote(str(run / 'checkpoints'))}"
    q = shlex.quote
    script = f"""
set -u
mount -t tmpfs -o size={size // 1024}k tmpfs {q(str(mount))} || exit 97
head -c {filler} /dev/zero > {q(str(mount / 'filler'))}
{cli} > {q(str(logs / 'first.out'))} 2> {q(str(logs / 'first.err'))}; echo $? > {q(str(logs / 'first.rc'))}
{inspect} {q(str(logs / 'after_failure.json'))}
rm {q(str(mount / 'filler'))}
{cli} --keep-training > {q(str(logs / 'second.out'))} 2> {q(str(logs / 'second.err'))}
echo $? > {q(str(logs / 'second.rc'))}
{inspect} {q(str(logs / 'after_resume.json'))}
"""
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "COLUMNS": "400"}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode == 97:
        pytest.skip(f"mounting the tmpfs is refused here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    first_err = (logs / "first.err").read_text()
    first = first_err + (logs / "first.out").read_text()

    # The run fails with exit 1 and one line, without a traceback.
    assert (logs / "first.rc").read_text().strip() == "1", first[-3000:]
    assert "Traceback" not in first and "inline_container" not in first, first[-3000:]
    # The plan warned before training (the filesystem holds fewer checkpoints than the run keeps) ...
    assert any(line.startswith("warning: disk: too little: ") for line in first_err.splitlines()), first[-3000:]
    # ... and the failure itself is one line.
    lines = [line for line in first_err.splitlines() if "disk full: writing" in line]
    assert len(lines) == 1, first[-3000:]
    line = lines[0]
    folder = run / "checkpoints"
    needed, free = (int(n.replace(",", "")) for n in
                    re.search(r"needs ([\d,]+) bytes .*?, ([\d,]+) bytes .*? are free", line).groups())
    after = json.loads((logs / "after_failure.json").read_text())
    saved = after["manifest"]["states"][0]["bytes"]
    assert f"writing {folder / 'step-00000002.pt'} needs" in line, line
    assert saved <= needed <= each and free < needed, (line, saved, each)  # the state's size; what the disk had
    assert abs(free - after["free"]) <= 1 << 16, (line, after["free"])
    assert f"checkpoint 1 ({folder / 'step-00000001.pt'}) is intact" in line, line
    assert line.rstrip().endswith("then run the same command with --keep-training"), line

    # Nothing lost: the earlier checkpoint matches its manifest entry, no temporary remains.
    assert after["newest"] == "step-00000001.pt" and not after["warnings"], after
    assert after["files"] == ["manifest.json", "step-00000001.pt"], after["files"]

    # Space freed: the same command with --keep-training continues from step 1 and finishes.
    second = (logs / "second.err").read_text() + (logs / "second.out").read_text()
    assert (logs / "second.rc").read_text().strip() == "0", second[-3000:]
    assert f"continuing {run} from step-00000001.pt" in second
    resumed = json.loads((logs / "after_resume.json").read_text())
    assert resumed["newest"] == "step-00000002.pt" and not resumed["warnings"], resumed
    assert resumed["files"] == ["best.pt", "manifest.json", "step-00000002.pt"], resumed["files"]
    assert resumed["manifest"]["best"]["step"] == 2


# -- the store alone, on a real full tmpfs: a state file, and an engine's staged folder ------------------
STORE = """
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from r2gen.checkpoint import CheckpointStore
from r2gen.errors import RunFailed
folder = Path(sys.argv[1]) / "checkpoints"
store, out = CheckpointStore(folder, keep_last=2), {}
store.save({"w": torch.ones(2**20)}, 1, 1)  # 4 MiB: fits
try:
    store.save({"w": torch.ones(2**21)}, 2, 1)  # 8 MiB: does not
except RunFailed as exc:
    out["state"] = str(exc)
staged = store.staging(3)
staged.mkdir()
try:  # an engine writing its own files (Accelerate: safetensors, whose error carries no errno)
    with store.writing(staged, 8 << 20, discard=staged):
        save_file({"w": torch.ones(2**21)}, str(staged / "model.safetensors"))
except RunFailed as exc:
    out["engine"] = str(exc)
newest, warnings = store.newest_intact()
out.update(files=sorted(os.listdir(folder)), newest=newest.name, warnings=warnings)
json.dump(out, open(sys.argv[2], "w"))
"""


def test_the_store_on_a_full_tmpfs_says_so_in_one_line_and_keeps_the_last_state(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    if reason := _namespace_refused(mount):
        pytest.skip(reason)
    report = tmp_path / "report.json"
    q = shlex.quote
    script = (f"mount -t tmpfs -o size=8m tmpfs {q(str(mount))} || exit 97; "
              f"{q(sys.executable)} -c {q(STORE)} {q(str(mount))} {q(str(report))}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": repo_pythonpath()})
    if done.returncode == 97:
        pytest.skip(f"mounting the tmpfs is refused here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(report.read_text())
    folder = mount / "checkpoints"
    for key, written in (("state", folder / "step-00000002.pt"), ("engine", folder / ".step-00000003.tmp")):
        message = out[key]
        assert message.startswith(f"disk full: writing {written} needs ") and "\n" not in message, message
        assert f"checkpoint 1 ({folder / 'step-00000001.pt'}) is intact" in message, message
        assert message.endswith("then run the same command with --keep-training"), message
    assert "needs 8,388,608 bytes (8.0 MiB)" in out["engine"]
    assert out["files"] == ["manifest.json", "step-00000001.pt"]  # no temporary, no staged folder left
    assert out["newest"] == "step-00000001.pt" and not out["warnings"]


# -- what counts as a full disk ----------------------------------------------------------------------------
def test_a_full_disk_is_recognised_by_errno_text_or_torch_writer_and_nothing_else(tmp_path: Path) -> None:
    import errno

    from r2gen.checkpoint import is_disk_full

    zip_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    huge = 1 << 62  # more than any disk holds free
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path, 0)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path, 0)
    assert is_disk_full(OSError(errno.EFBIG, "File too large"), tmp_path, 0)
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
                        tmp_path, 0)  # safetensors
    assert is_disk_full(zip_writer, tmp_path, huge)
    assert not is_disk_full(zip_writer, tmp_path, 0)  # the disk has room: some other failure
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    except RuntimeError as chained:
        assert is_disk_full(chained, tmp_path, 0)  # the OSError it was raised from
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, huge)
    assert not is_disk_full(RuntimeError("boom"), tmp_path, huge)


def test_other_failures_while_saving_are_not_called_a_full_disk(tmp_path: Path) -> None:
    import torch

    from r2gen.checkpoint import CheckpointStore

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("not picklable")

    store = CheckpointStore(tmp_path, keep_last=2)
    store.save({"w": torch.ones(3)}, 1, 1)
    with pytest.raises(RuntimeError, match="not picklable"):
        store.save({"w": torch.ones(3), "bad": Unpicklable()}, 2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "step-00000001.pt"]
