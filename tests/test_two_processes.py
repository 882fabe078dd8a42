"""Two processes against one with the same global batch: the plain engine's data parallel and DeepSpeed ZeRO-2.

Each of 2 processes takes its share of one window (uneven report lengths, so the processes hold
different token counts); one process takes the whole window. The mean of the two processes'
first-step losses must equal the single process's loss, and the updates must agree, to bounds
derived from the arithmetic (_compare): plain in float64, DeepSpeed in fp32. On a CPU the processes
talk over gloo; with two GPUs (marked gpu) over NCCL, one GPU each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from launcher.probe import synthetic_batch
from launcher.spawn import free_port
from r2gen.config import preset

CFG = preset("tiny").replace(image_size=64)
VOCAB = 50
ROWS = {0: slice(0, 4), 1: slice(4, 7)}


def _window() -> dict:
    batch = synthetic_batch(CFG, VOCAB, 7)
    lengths = torch.tensor([60, 12, 30, 7, 45, 20, 9])
    batch["masks"] = (torch.arange(60)[None, :] < lengths[:, None]).float()
    batch["targets"] = batch["targets"] * batch["masks"].long()
    return batch


def _run(rank: int, world: int, engine: str, device: str, port: int, out: str) -> None:
    """One process: build the engine, take this rank's rows (all of them alone), one step, save."""
    from backends.registry import build_backend
    from backends.deepspeed import DeepSpeedOptions, deepspeed_json
    from r2gen.model.r2gen import R2GenModel
    from r2gen.step import train_step

    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if device == "cuda":  # this process only: fp32 without TF32, the same algorithms in both runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    backend = build_backend(engine, device, "fp32")  # DeepSpeed too: its fp32 ZeRO-2 (bf16 would round at 2^-8)
    window = _window()
    if engine == "plain":  # float64 (gloo and NCCL reduce it): the rounding left is far below the bounds
        window["images"] = window["images"].double()
    rows = ROWS[rank] if world > 1 else slice(0, 7)
    local = {k: v[rows] for k, v in window.items()}
    micro = 2
    if engine == "deepspeed":
        accumulation = -(-len(local["ids"]) // micro)
        config = deepspeed_json("fp32", micro, accumulation, world, False, DeepSpeedOptions(zero=2, offload="none"))
        config["zero_allow_untested_optimizer"] = True  # SGD: the update is the gradient itself
        backend.configure(config)
    torch.manual_seed(0)
    model = R2GenModel(CFG.model, VOCAB).eval()  # no dropout, fixed BatchNorm: the same function everywhere
    if engine == "plain":
        model.double()
    before = [p.detach().double().cpu().clone() for p in model.parameters()]
    model, optimizer = backend.prepare(model, lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    loss, stepped = train_step(model, optimizer, backend, local, clip_value=1e9, micro_batch=micro)
    after = [p.detach().double().cpu() for p in backend.unwrap(model).parameters()]
    torch.save({"loss": loss, "stepped": stepped, "update": torch.cat([(a - b).flatten() for a, b in zip(after, before)])},
               f"{out}.{rank}")
    torch.distributed.barrier() if world > 1 else None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _compare(engine: str, device: str, tmp_path: Path) -> None:
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    mp.spawn(_run, args=(2, engine, device, free_port(), two), nprocs=2, join=True)
    mp.spawn(_run, args=(1, engine, device, 0, one), nprocs=1, join=True)
    ranks = [torch.load(f"{two}.{r}") for r in (0, 1)]
    single = torch.load(f"{one}.0")
    assert all(r["stepped"] for r in ranks) and single["stepped"]
    # Each process's loss is its tokens' NLL over the mean token count per process: their mean is the window's.
    mean_loss = sum(r["loss"] for r in ranks) / 2
    # Bounds from the arithmetic. Both runs take the same micro-batches of 2 (rows 0-1, 2-3 | 4-5, 6) with
    # the same weights, and their per-token gradient seeds differ by exactly 2 (1/88 against 1/176), so
    # only the grouping of the four micro-batches' sums differs: ((c1+c2)+c3)+c4 against (c1+c2)+(c3+c4).
    # - loss: fp32 sums of positive terms, three additions regrouped: 3 units of 2^-24 (seen 0.5); 16 allowed.
    # - update: per element at most 3 roundings of sum|c_i|, and the window's gradients barely cancel
    #   (||sum|c_i| || = 1.12 ||sum c_i||): float64 (plain): 3.7e-16, 1e-12 allowed (seen 1.6e-16);
    #   fp32 (DeepSpeed): 3.4 units, plus the SGD step's rounding of the fp32 weights, at most one ulp of
    #   each (||ulp(w)|| = 24 units of ||update||): 2^-16 (256 units) allowed (seen 1.3 units).
    # Without the token all-reduce the update is off by the processes' token ratio (105 vs 71 tokens: 19%),
    # with DeepSpeed's extra division by its accumulation count by 50%.
    assert mean_loss == pytest.approx(single["loss"], rel=16 * 2.0**-24)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=0.05)  # the shares really differ (4.85, 3.33)
    update, reference = ranks[0]["update"], single["update"]
    assert torch.equal(ranks[0]["update"], ranks[1]["update"])  # every process holds the same weights
    assert ((update - reference).norm() / reference.norm()).item() < (2.0**-16 if engine == "deepspeed" else 1e-12)


@pytest.mark.parametrize("engine", ["plain", "deepspeed"])
def test_two_cpu_processes_match_one_with_the_same_global_batch(engine: str, tmp_path: Path) -> None:
    if torch.cuda.is_available() and engine == "deepspeed":
        pytest.skip("DeepSpeed runs on its CUDA accelerator where there is one: see the two-GPU test")
    _compare(engine, "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["plain", "deepspeed"])
def test_two_gpus_match_one_with_the_same_global_batch(engine: str, tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _compare(engine, "cuda", tmp_path)
