"""The DeepSpeed adapter with the real DeepSpeed engine (ZeRO-2, one process): on the CPU with gloo
(CI), on the GPU with NCCL where there is one (DeepSpeed then runs on its CUDA accelerator).

In fp32 ZeRO-2 gives bitwise the plain path's update (tested); bf16 weights make it differ by
rounding, and those tests' tolerances come from bf16's 8-bit significand, many times below what
the known mistakes (no value clipping, DeepSpeed's extra division by the accumulation count) give.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from backends.deepspeed import DeepSpeedBackend
from backends.plain import PlainBackend
from backends.deepspeed import DeepSpeedOptions, deepspeed_json
from launcher.probe import synthetic_batch
from r2gen.build import optimizer_factory
from r2gen.config import preset
from r2gen.errors import BackendError, ConfigError
from r2gen.model.r2gen import R2GenModel
from r2gen.step import train_step

CFG = preset("tiny").replace(image_size=64)
VOCAB = 50
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _one_process_group():
    """The adapter's process group of one lives for this module (DeepSpeed caches its groups), then
    goes, so later tests see a process without one."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _model() -> R2GenModel:
    torch.manual_seed(0)
    return R2GenModel(CFG.model, VOCAB).eval()  # no dropout: every path computes the same function


def _deepspeed(micro: int, accumulation: int, offload: str = "none", untested_ok: bool = False) -> DeepSpeedBackend:
    backend = DeepSpeedBackend(DEVICE, "bf16")
    config = deepspeed_json("bf16", micro, accumulation, 1, False, DeepSpeedOptions(zero=2, offload=offload))
    if untested_ok:
        config["zero_allow_untested_optimizer"] = True  # plain SGD: updates that show the gradient itself
    backend.configure(config)
    return backend


def _flat(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The fp32 weights the optimizer steps (under ZeRO: its flat partitions)."""
    return torch.cat([p.detach().float().flatten() for g in optimizer.param_groups for p in g["params"]])


def nearer_the_right_than_the_mistake(got: float, right: float, mistaken: float) -> bool:
    """bf16 rounding carried through the model's depth has no useful closed-form bound (first order,
    k sequential roundings give up to k x 2^-8, and the tiny model's gradient passes through dozens),
    so these tests tell the right result from a known mistake's (computed, or run beside it in the
    test) by the midpoint between the two, not by a tolerance one machine measured."""
    return abs(got - right) < abs(got - mistaken)


def test_zero2_tracks_the_plain_bf16_path() -> None:
    batch = synthetic_batch(CFG, VOCAB, 6)
    plain = PlainBackend(DEVICE, "bf16")
    model, optimizer = plain.prepare(_model(), optimizer_factory(CFG))
    reference = [train_step(model, optimizer, plain, batch, CFG.clip_value, 3)[0] for _ in range(3)]
    # the mistake to tell it from: the plain bf16 path stepping at half the learning rates
    slow = CFG.replace(lr_ve=CFG.lr_ve / 2, lr_ed=CFG.lr_ed / 2)
    model, optimizer = plain.prepare(_model(), optimizer_factory(slow))
    mistaken = [train_step(model, optimizer, plain, batch, CFG.clip_value, 3)[0] for _ in range(3)]

    ds = _deepspeed(3, 2)
    engine, ds_optimizer = ds.prepare(_model(), optimizer_factory(CFG))
    assert "ZeRO-2" in ds.describe() and "amsgrad" in ds.describe()
    assert ds_optimizer.defaults["fused"]  # built on the device it steps on (the model was moved first)
    assert [g["lr"] for g in ds_optimizer.param_groups] == [CFG.lr_ve, CFG.lr_ed]
    scheduler = torch.optim.lr_scheduler.StepLR(ds_optimizer, 1, 0.5)  # as the loop builds it
    losses = []
    for _ in range(3):
        loss, stepped = train_step(engine, ds_optimizer, ds, batch, CFG.clip_value, 3)
        assert stepped
        losses.append(loss)
    # Learning as the plain path does: each loss after an update nearer the plain bf16 path's than the
    # same path's at half the learning rates (the first is the same weights' forward in all three).
    for got, right, wrong in zip(losses[1:], reference[1:], mistaken[1:]):
        assert nearer_the_right_than_the_mistake(got, right, wrong), (losses, reference, mistaken)
    scheduler.step()  # the engine steps with the scheduler's learning rates
    assert [g["lr"] for g in ds_optimizer.param_groups] == [CFG.lr_ve / 2, CFG.lr_ed / 2]


@pytest.mark.parametrize("clip", [1e-4, 0.0])
def test_gradient_values_are_clipped_like_r2gen(clip: float) -> None:
    ds = _deepspeed(6, 1, untested_ok=True)
    engine, optimizer = ds.prepare(_model(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    before = _flat(optimizer).clone()
    train_step(engine, optimizer, ds, synthetic_batch(CFG, VOCAB, 6), clip, 6)
    change = (_flat(optimizer) - before).abs()
    if clip:
        # SGD at lr 1 moves each weight by its clipped gradient, seen through two fp32 roundings (the
        # update, the difference): within 2 x half a unit in the last place of the largest weight.
        assert change.max().item() == pytest.approx(clip, abs=before.abs().max().item() * 2.0**-23)
    else:
        assert change.max().item() > 100 * 1e-4


def _sgd_update(backend, model, micro: int, batch: dict, clip: float) -> torch.Tensor:
    """The first SGD(lr=1) update: minus the window's (clipped) gradient, as the optimizer's flat fp32 weights."""
    engine, optimizer = backend.prepare(model, lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    before = _flat(optimizer).clone()
    train_step(engine, optimizer, backend, batch, clip, micro)
    return _flat(optimizer) - before


@pytest.mark.parametrize("micro,accumulation", [(6, 1), (3, 2)])
def test_fp32_window_update_equals_the_plain_path_exactly(micro: int, accumulation: int, monkeypatch) -> None:
    """In fp32 ZeRO-2 computes the same numbers as plain PyTorch: one micro-batch of 6, or two of 3
    accumulated (DeepSpeed neither divides by its accumulation count again nor steps early), give
    bitwise the update of the plain path with the same micro-batches. Exact, so any CPU passes it."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same algorithms on both paths
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    batch = synthetic_batch(CFG, VOCAB, 6)
    ds = DeepSpeedBackend(DEVICE, "fp32")
    config = deepspeed_json("fp32", micro, accumulation, 1, False, DeepSpeedOptions(zero=2, offload="none"))
    ds.configure({**config, "zero_allow_untested_optimizer": True})  # plain SGD: the update shows the gradient
    deepspeed = _sgd_update(ds, _model(), micro, batch, 0.0)
    plain = _sgd_update(PlainBackend(DEVICE, "fp32"), _model(), micro, batch, float("inf"))
    assert deepspeed.abs().max() > 0
    # ZeRO's flat buffer is padded to its alignment: the weights are its first elements.
    assert torch.equal(deepspeed[:plain.numel()], plain)
    assert not deepspeed[plain.numel():].any()


def test_bf16_accumulation_keeps_the_window_gradient() -> None:
    """bf16: two micro-batches of 3 give the update of one micro-batch of 6, not half of it (what
    DeepSpeed's extra division by the accumulation count gives). The two orders round differently
    (bf16 weights, kernels that change with the batch): measured 0.6% on an AMD EPYC, 3.6% on an
    Intel Xeon, 2.4% on an H200; accepted while nearer the whole window's update than its half."""
    batch = synthetic_batch(CFG, VOCAB, 6)
    whole, split = (_sgd_update(_deepspeed(micro, accumulation, untested_ok=True), _model(), micro, batch, 0.0)
                    for micro, accumulation in ((6, 1), (3, 2)))
    assert (split - whole).norm() < (split - whole / 2).norm()
    assert nearer_the_right_than_the_mistake((split.norm() / whole.norm()).item(), 1.0, 0.5)


def test_cpu_offload_steps_with_deepspeed_cpu_adam() -> None:
    """The offload path JIT-builds DeepSpeedCPUAdam (about a minute, once per machine)."""
    ds = _deepspeed(3, 2, offload="cpu")
    engine, optimizer = ds.prepare(_model(), optimizer_factory(CFG))
    assert type(optimizer).__name__ == "DeepSpeedCPUAdam" and "no AMSGrad" in ds.describe()
    batch = synthetic_batch(CFG, VOCAB, 6)
    losses = [train_step(engine, optimizer, ds, batch, CFG.clip_value, 3)[0] for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_offload_without_ninja_is_refused_with_the_fix(tmp_path, monkeypatch) -> None:
    """DeepSpeed itself only says its cpu_adam op "failed to build/load" (seen on a GPU host whose ninja
    was installed off PATH)."""
    ds = _deepspeed(3, 2, offload="cpu")  # (on a CPU DeepSpeed's process group JIT-builds its shm op)
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH holding no ninja
    with pytest.raises(BackendError, match="ninja, which is not on PATH .*--offload none"):
        ds.prepare(_model(), optimizer_factory(CFG))


def test_precisions_deepspeed_cannot_serve_are_refused() -> None:
    with pytest.raises(BackendError, match="--precision fp8"):
        DeepSpeedBackend(DEVICE, "fp8")
    if DEVICE == "cpu":
        with pytest.raises(BackendError, match="--precision fp16"):
            DeepSpeedBackend("cpu", "fp16")
    with pytest.raises(BackendError, match="--zero 3"):
        DeepSpeedOptions(zero=3)


def test_out_of_memory_stops_instead_of_redoing_on_top_of_partial_gradients() -> None:
    """ZeRO keeps the window's partial gradients inside the engine: redoing the step smaller would
    count the first micro-batch twice (measured: the update off by 70%), so the loop stops cleanly."""
    from r2gen.step import OomRecovery, OutOfMemoryAtOne

    ds = _deepspeed(3, 2, untested_ok=True)
    engine, optimizer = ds.prepare(_model(), lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
    forward, calls = engine.module.forward, []

    def failing_forward(images, targets):
        calls.append(len(images))
        if len(calls) == 2:  # the second micro-batch, after the first one's backward
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(images, targets)

    engine.module.forward = failing_forward
    before = _flat(optimizer).clone()
    with pytest.raises(OutOfMemoryAtOne, match="under deepspeed.*cannot be redone smaller"):
        OomRecovery(3, wait_s=0).step(engine, optimizer, ds, synthetic_batch(CFG, VOCAB, 6), 0.0)
    assert torch.equal(_flat(optimizer), before)  # nothing was applied


class _RunsCode:
    """Unpickled, calls os.mkdir(path): what a doctored checkpoint could do with any function."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_deepspeed_run_continues_from_its_engine_checkpoint(small_set, tmp_path) -> None:
    """Resumable states of a DeepSpeed run are DeepSpeed's own checkpoint (ZeRO partitions) plus the
    loop's state: continuing mid-epoch from one ends with bitwise the same weights and losses."""
    import json
    import shutil

    from rich.console import Console

    from r2gen.checkpoint import CheckpointStore, load_checkpoint
    from r2gen.data.datasets import load_annotation
    from r2gen.build import prepare
    from r2gen.train import train

    annotation = load_annotation(small_set)
    cfg = preset("tiny").replace(image_size=32, window_size=7, num_workers=0, log_every=1, val_every=0, beam_size=1,
                                 epochs=1, save_every=1, keep_last=2)

    def run(run_dir, resume=None):
        prep = prepare(cfg, _deepspeed(7, 1), annotation, None)
        return train(prep, run_dir, Console(quiet=True), resume=resume)

    def losses(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(whole)  # 21 train studies in windows of 7: 3 steps
    entries = CheckpointStore(whole / "checkpoints").manifest()["states"]
    assert [e["step"] for e in entries] == [2, 3] and all("files" in e for e in entries)
    shutil.copytree(whole, cut)
    run(cut, resume=cut / "checkpoints" / "step-00000002")  # mid-epoch
    assert losses(cut) == losses(whole) and [s for s, _ in losses(cut)] == [1, 2, 3]
    a = load_checkpoint(whole / "checkpoints" / "step-00000003" / "loop.pt")["model"]
    b = load_checkpoint(cut / "checkpoints" / "step-00000003" / "loop.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A doctored engine file (a pickle that calls os.mkdir when unpickled) is refused, naming it, and its
    # code does not run: DeepSpeed's own reader would have run it.
    doctored, marker = tmp_path / "doctored", tmp_path / "the-pickle-ran"
    shutil.copytree(whole, doctored)
    optim = next((doctored / "checkpoints" / "step-00000002" / "engine").glob("*optim_states.pt"))
    states = torch.load(optim, weights_only=False)  # our own file, written above
    states["payload"] = _RunsCode(str(marker))
    torch.save(states, optim)
    with pytest.raises(ConfigError, match=re.escape(f"--keep-training: {optim} is not a readable checkpoint (it would load {os.mkdir.__module__}.mkdir")):
        run(doctored, resume=doctored / "checkpoints" / "step-00000002")
    assert not marker.exists()
    torch.load(optim, weights_only=False)  # the doctoring works: full unpickling runs it
    assert marker.is_dir()

    # `evaluate --checkpoint` reads the engine's step folder like any other checkpoint. The run kept
    # its weights in bf16; evaluation upcasts them and computes under autocast, so the loss agrees
    # to rounding, not bitwise: accepted while nearer the run's own test loss than the untrained
    # model's (its first step's loss: what weights that were not read would give).
    from launcher.evaluate import evaluate_checkpoint

    got = evaluate_checkpoint(whole / "checkpoints" / "step-00000003", device="cpu", precision="bf16", num_workers=0,
                              ann_path=small_set)
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    own = next(r["test/loss"] for r in reversed(records) if "test/loss" in r)
    untrained = next(r["train/loss"] for r in records if "train/loss" in r)
    assert len(got.records) == 6 and nearer_the_right_than_the_mistake(got.scores["loss"], own, untrained)
    assert got.output == whole / "reports" / "evaluate-test-step-00000003-beam1.json" and got.output.is_file()
