"""Out-of-memory recovery in agreement across processes: two processes under torchrun (gloo, CPU), an
out-of-memory error on rank 1 only, once in a forward and once in the window's last backward (after
the later layers' gradients were ready: where DDP had reduced buckets). Both processes must drop the
window, halve their micro-batch and redo it, in bounded time; every study of the epoch counts once
(the weights equal those of a run without errors, float64) and both ranks end with the same weights.

Run as a script, this module is one torchrun worker (argv: output prefix, faults "none" or "inject").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WINDOWS, STUDIES, MICRO = 3, 6, 4
FORWARD_FAULT = 2
"""Rank 1's third forward raises: window 1's first micro-batch (window 0 took forwards 0 and 1)."""
BACKWARD_FAULT = 7
"""Rank 1's eighth backward through the first convolution raises: window 2's last micro-batch at
micro-batch 2 (window 0: backwards 0-1; window 1 redone in 2s: 2-4; window 2: 5-7)."""
UPDATE_RULE = 2.0**-32
"""float64 (unit roundoff 2^-53): the update sums each window's per-token gradients in other micro-batch
orders, which changes it by a few units of 2^-53 times the model's conditioning; 2^-32 leaves 2^21 of
room and is ~10^8 below what one study counted twice or not at all changes (a sixth of a window)."""
TIME_LIMIT_S = 300


def _worker(out: str, faults: str) -> None:
    from backends.plain import PlainBackend
    from launcher.probe import synthetic_batch
    from r2gen.config import preset
    from r2gen.model.r2gen import R2GenModel
    from r2gen.step import OomRecovery

    backend = PlainBackend("cpu", "fp32")
    rank = backend.rank
    cfg = preset("tiny").replace(image_size=64)
    torch.manual_seed(0)
    # No dropout, fixed BatchNorm, float64: any micro-batch split computes the same window gradient.
    model = R2GenModel(cfg.model, 50).eval().double()
    inner = model
    if faults == "inject" and rank == 1:
        calls = {"forward": 0, "backward": 0}

        def forward(images, targets):
            calls["forward"] += 1
            if calls["forward"] - 1 == FORWARD_FAULT:
                raise torch.OutOfMemoryError("injected: out of memory in forward on rank 1")
            return type(inner).forward(inner, images, targets)

        def backward_hook(grad):
            calls["backward"] += 1
            if calls["backward"] - 1 == BACKWARD_FAULT:
                raise torch.OutOfMemoryError("injected: out of memory in backward on rank 1")
            return grad

        inner.forward = forward
        next(inner.visual_extractor.parameters()).register_hook(backward_hook)  # the first layer: reached last
    model, optimizer = backend.prepare(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    before = torch.cat([p.detach().flatten() for p in inner.parameters()]).clone()
    oom = OomRecovery(MICRO, retries=0, wait_s=0)
    losses = []
    for window in range(WINDOWS):
        torch.manual_seed(1000 * rank + window)  # each rank's own studies
        batch = synthetic_batch(cfg, 50, STUDIES)
        batch["images"] = batch["images"].double()
        losses.append(oom.step(model, optimizer, backend, batch, clip_value=1e9)[0])
    after = torch.cat([p.detach().flatten() for p in inner.parameters()])
    torch.save({"update": after - before, "micro": oom.micro_batch, "recoveries": oom.recoveries,
                "losses": losses}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _torchrun(out: Path, faults: str) -> list[dict]:
    """Both ranks' results; fails the test when the two processes do not finish within TIME_LIMIT_S."""
    from child_env import repo_pythonpath
    from launcher.spawn import free_port

    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", __file__, str(out), faults]
    child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group: a hang is killed with its workers
    try:
        output, _ = child.communicate(timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        raise AssertionError(f"the two processes did not finish in {TIME_LIMIT_S} s (hung): {output[-2000:]}")
    assert child.returncode == 0, output[-3000:]
    return [torch.load(f"{out}.{rank}") for rank in (0, 1)]


def test_an_out_of_memory_error_on_one_rank_is_redone_by_both(tmp_path: Path) -> None:
    clean = _torchrun(tmp_path / "clean", "none")
    faulty = _torchrun(tmp_path / "faulty", "inject")
    assert [r["micro"] for r in clean] == [MICRO, MICRO] and [r["recoveries"] for r in clean] == [0, 0]
    # Both ranks halved twice, together (rank 0 had no error of its own), and redid both windows.
    assert [r["micro"] for r in faulty] == [1, 1] and [r["recoveries"] for r in faulty] == [2, 2]
    assert torch.equal(faulty[0]["update"], faulty[1]["update"])  # one model on both ranks
    reference = clean[0]["update"]
    error = float((faulty[0]["update"] - reference).norm() / reference.norm())
    assert error <= UPDATE_RULE, error  # every study counted once: the same three windows' steps
    for a, b in zip(faulty, clean):  # the window losses are summed in float32 over at most 6 micro-batches
        assert a["losses"] == pytest.approx(b["losses"], rel=8 * 2.0**-24)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1], sys.argv[2])
