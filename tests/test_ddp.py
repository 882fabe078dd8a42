"""Several processes on a CPU (gloo): a data-parallel step equals the single-process step on the whole
window, with per-token normalization across processes; and `--gpus 2` trains end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from backends.plain import PlainBackend
from launcher.probe import synthetic_batch
from launcher.spawn import free_port
from r2gen.config import preset
from r2gen.model.r2gen import R2GenModel
from r2gen.step import train_step
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]


def _window() -> dict:
    batch = synthetic_batch(preset("tiny").replace(image_size=64), 50, 7)
    batch["images"] = batch["images"].double()  # float64 model (below): gloo reduces float64 too
    lengths = torch.tensor([60, 12, 30, 7, 45, 20, 9])  # uneven: the two processes hold different token counts
    batch["masks"] = (torch.arange(60)[None, :] < lengths[:, None]).float()
    batch["targets"] = batch["targets"] * batch["masks"].long()
    return batch


def _model_and_optimizer(backend: PlainBackend):
    cfg = preset("tiny").replace(image_size=64)
    torch.manual_seed(0)
    # No dropout, fixed BatchNorm: the same function everywhere; float64, so that summing the window's
    # gradients in another order (micro-batches of 2 on two processes, one of 7 here) rounds ~1e-16.
    model = R2GenModel(cfg.model, 50).eval().double()
    return backend.prepare(model, lambda m: torch.optim.SGD(m.parameters(), lr=1.0))


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    backend = PlainBackend("cpu", "fp32")
    model, optimizer = _model_and_optimizer(backend)
    window = _window()
    rows = slice(0, 4) if rank == 0 else slice(4, 7)
    local = {"ids": window["ids"][rows], "images": window["images"][rows], "targets": window["targets"][rows],
             "masks": window["masks"][rows]}
    train_step(model, optimizer, backend, local, clip_value=1e9, micro_batch=2)
    if rank == 0:
        torch.save([p.detach() for p in backend.unwrap(model).parameters()], out)
    torch.distributed.destroy_process_group()


def test_ddp_step_equals_the_single_process_window(tmp_path: Path) -> None:
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(free_port(), out), nprocs=2, join=True)
    backend = PlainBackend("cpu", "fp32")
    model, optimizer = _model_and_optimizer(backend)
    start = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, backend, _window(), clip_value=1e9, micro_batch=7)
    for ddp, single, before in zip(torch.load(out), model.parameters(), start):
        # Compared as updates, relative to the update's size. The loss's per-token gradient seed is the
        # same fp32 number on both sides (1/88 = 2 * (1/176), exactly: 176 tokens, 88 per process), so
        # they differ by float64 summation order alone: n * 2^-53 of the summed terms' size, worst case
        # (n ~ 1e5 in the convolutions' sums), for updates of order 1. The attention key biases' gradients
        # are zero in exact arithmetic, float64 noise of that size, hence the absolute term. Without the
        # token all-reduce the updates differ by tens of percent.
        update, expected = ddp - before, single.detach() - before
        assert (update - expected).norm() <= 1e-10 * expected.norm() + 1e-12


def test_two_processes_train_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "plain", "--preset", "tiny", "--device", "cpu",
                             "--gpus", "2", "--studies", "20", "--epochs", "2", "--beam-size", "1",
                             "--effective-batch", "8", "--log-every", "1", "--run-dir", str(tmp_path / "runs"),
                             "--name", "ddp"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "R2Gen scores after 2 epochs" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes: every step once
    assert [r["train/samples"] for r in records if "train/samples" in r] == [14, 14]
    plan = json.loads((tmp_path / "runs" / "ddp" / "plan.json").read_text())
    assert plan["batch"]["world_size"] == 2 and plan["batch"]["micro_batch"] == 4
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "step-00000004.pt").is_file()
