"""The training step's GPU speed-ups (r2gen.speedups) compute the plain path's function.

CUDA graphs of the encoder-decoder: with dropout off, the replayed forward and backward give the
eager log-probabilities and every gradient (parameters and the visual features) to float32
rounding (FP32_GRADIENT_RULE, 2^-16 relative; the padded shape may pick other kernels), also across
an accumulation window of two micro-batches and after the optimizer has changed the weights. With
dropout on, 100 training steps with every speed-up track the plain path's loss curve (each 10-step
mean within twice the spread that other dropout draws give the plain path with the same seed,
measured in the test). On a CPU the model is untouched; only the fused Adam applies, and it takes
the per-tensor loop's steps.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from rich.console import Console

from backends.accelerate import AccelerateBackend
from backends.deepspeed import DeepSpeedBackend
from backends.fp8 import Fp8Backend
from backends.plain import PlainBackend
from r2gen.build import prepare, prepare_model
from r2gen.config import preset
from r2gen.data.datasets import load_annotation
from r2gen.model.r2gen import R2GenModel, masked_nll
from r2gen.speedups import (CudaGraphed, cudnn_autotuning, eager_path, graphed_method, planned_speedups,
                            release_graphs, speed_up)
from r2gen.train import train

VOCAB = 40
FP32_GRADIENT_RULE = 2.0**-16
"""Two fp32 computations of the encoder-decoder's gradients in other summation orders agree to this, per
tensor in norm: 256 units of 2^-24, twice the 87 units (at most, any tensor) by which the trimmed and the
padded batch's fp32 gradients are each off the float64 ones. That error is the model's conditioning
times fp32's roundoff, the same on any machine; which kernels run only reorders it."""


def _batch(cfg, batch: int, width: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch features (B, views*HW, d_vf), targets of several lengths and their masks."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, cfg.model.num_views * 4, cfg.model.d_vf, generator=g)
    lengths = torch.randint(3, width + 1, (batch,), generator=g)
    lengths[0] = width
    targets = torch.randint(1, VOCAB + 1, (batch, width), generator=g)
    masks = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    targets = targets * masks
    targets[:, 0] = 0
    return feats.to(device).requires_grad_(), targets.to(device), masks.to(device)


def _no_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def test_speed_ups_leave_a_cpu_model_untouched() -> None:
    cfg = preset("tiny")
    model = R2GenModel(cfg.model, VOCAB)
    keys = list(model.state_dict())
    wrapped, optimizer = prepare_model(PlainBackend("cpu"), model, cfg)
    assert speed_up(wrapped, PlainBackend("cpu"), cfg) == []
    assert "forward" not in model.__dict__ and "forward_features" not in model.__dict__
    assert list(model.state_dict()) == keys
    assert optimizer.defaults["fused"]  # the CPU has a fused Adam too: the one speed-up that applies there
    _, plain = prepare_model(PlainBackend("cpu"), R2GenModel(cfg.model, VOCAB), cfg.without_speedups())
    assert not plain.defaults.get("fused")


def test_fused_adam_on_a_cpu_takes_the_per_tensor_steps() -> None:
    """The fused Adam(amsgrad, L2 weight decay, two learning rates) and torch's per-tensor loop take the
    same steps: 20 of them, on every parameter of the tiny model, to float32 rounding.

    Bound: each step the two compute the same update in other operation orders (a few units of 2^-24
    of the update, lr = 2e-3 at most) and round the new fp32 weight (at most 1 ulp of it apart); over 20
    steps that is ~20-40 units of 2^-24 of the weight (rtol 1e-5 = 168 units) plus ~1e-8 absolute for
    weights near 0 (atol 1e-6). Seen: 1.3% of that allowance. Dropping the weight decay breaks it 4000
    times over, dropping AMSGrad 7 times."""
    cfg = preset("tiny").replace(weight_decay=5e-3)  # a decay large enough to matter in 20 steps
    models, optimizers = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = R2GenModel(cfg.model, VOCAB)
        _, optimizer = prepare_model(PlainBackend("cpu"), model, cfg.replace(fused_optimizer=fused))
        assert bool(optimizer.defaults.get("fused")) == fused
        models.append(model)
        optimizers.append(optimizer)
    start = [p.detach().clone() for p in models[0].parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
            optimizer.step()
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(models[0].parameters(), start))
    assert moved > 1e-3  # the steps did move the weights
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("backend,world_size,expected", [
    (PlainBackend, 1, ["channels_last", "cudnn_benchmark", "fused_memory", "cuda_graphs"]),
    (AccelerateBackend, 1, ["channels_last", "cudnn_benchmark", "fused_memory", "cuda_graphs"]),
    (AccelerateBackend, 2, ["channels_last", "cudnn_benchmark", "fused_memory"]),  # graphs: one process only
    # its swapped Linear layers are not captured (the fused memory sees them at install and stays off)
    (Fp8Backend, 1, ["channels_last", "cudnn_benchmark", "fused_memory"]),
    # ZeRO-2's parameters are views of its flat buffer: a layout change after initialize unlinks them
    # (an H200 run of the deepspeed engine failed in its gradient buckets' view(-1)).
    (DeepSpeedBackend, 1, ["cudnn_benchmark", "fused_memory"]),
], ids=["plain", "accelerate", "accelerate-2", "fp8", "deepspeed"])
def test_planned_speedups_per_backend(backend: type, world_size: int, expected: list[str]) -> None:
    cfg = preset("iu_xray")
    assert planned_speedups(cfg, backend, "cuda", world_size) == expected
    assert planned_speedups(cfg, backend, "cpu", world_size) == []
    assert planned_speedups(cfg.without_speedups(), backend, "cuda", world_size) == []


def test_the_graphs_take_the_whole_model_unless_only_the_encoder_decoder_is_asked_for() -> None:
    cfg = preset("iu_xray")
    assert graphed_method(cfg) == "forward"
    assert graphed_method(cfg.replace(graph_visual_extractor=False)) == "forward_features"


def test_graphed_features_fall_back_to_the_eager_path_off_the_gpu() -> None:
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = R2GenModel(cfg.model, VOCAB).train()
    _no_dropout(model)
    feats, targets, _ = _batch(cfg, 3, 9, "cpu", 0)
    images = torch.randn(3, 2, 3, 32, 32)
    expected = model.forward_features(feats, targets)
    expected_whole = model(images, targets)
    keys = list(model.state_dict())
    graphed = CudaGraphed.install(model, "forward_features")
    whole = CudaGraphed.install(model)
    assert CudaGraphed.install(model, "forward_features") is graphed and CudaGraphed.install(model) is whole  # once
    assert list(model.state_dict()) == keys  # not a submodule
    assert torch.equal(model.forward_features(feats, targets), expected)
    assert torch.equal(model(images, targets), expected_whole)
    assert graphed.captures == whole.captures == 0
    with eager_path(model):  # the model's own methods inside, the same graphs after
        assert CudaGraphed.all_installed(model) == []
    assert CudaGraphed.installed(model, "forward_features") is graphed and CudaGraphed.installed(model) is whole
    CudaGraphed.uninstall(model)
    assert "forward_features" not in model.__dict__ and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="method"):
        CudaGraphed.install(model, "extract")


def test_padding_targets_to_max_seq_length_changes_no_output_or_gradient() -> None:
    """What the graphs rely on: trailing padding is ignored by the causal decoder and the masks, so
    the padded batch's outputs, sliced back, and every gradient equal the trimmed batch's (float64)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = R2GenModel(cfg.model, VOCAB).double().train()
    _no_dropout(model)
    feats, targets, masks = _batch(cfg, 4, 11, "cpu", 3)
    feats = feats.detach().double()
    results = []
    for padded in (False, True):
        model.zero_grad(set_to_none=True)
        x = feats.clone().requires_grad_()
        given = torch.nn.functional.pad(targets, (0, cfg.model.max_seq_length - 11)) if padded else targets
        logprobs = model.forward_features(x, given)[:, :10]
        masked_nll(logprobs, targets, masks).backward()
        results.append([logprobs.detach()] + [p.grad.clone() for p in model.encoder_decoder.parameters()] + [x.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_relational_memory_starts_on_the_device_and_dtype_asked_for() -> None:
    rm = R2GenModel(preset("tiny").model, VOCAB).encoder_decoder.model.rm
    like = torch.zeros(1, dtype=torch.float64)
    assert torch.equal(rm.init_memory(4, like), rm.init_memory(4).double())
    assert rm.init_memory(4, like).dtype == torch.float64


def _grads(model: R2GenModel, feats: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.encoder_decoder.parameters()] + [feats.grad.clone()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, scale: torch.Tensor | None = None) -> bool:
    scale = b if scale is None else scale
    return bool((a.float() - b.float()).norm() <= rel * scale.float().norm() + 1e-12)


def _off_gradients(names: list[str], replayed: list[torch.Tensor], eager: list[torch.Tensor],
                   rel: float) -> dict[str, float]:
    """Tensors whose replayed gradient is not within rel of the eager one, with their relative errors.

    The attention key projections' biases (`linears.1.bias`: query, key, value, output) get a zero
    gradient in exact arithmetic, since adding one number to every score of a query leaves its softmax
    unchanged; theirs is rounding noise (about 1e-9 in fp32 against 0.5 for the key weights), which
    any other summation order (another kernel, the padded width) changes completely. They are measured
    against the gradient of their whole key projection (weight and bias) instead of their own."""
    grads = dict(zip(names, eager))
    off = {}
    for name, r, e in zip(names, replayed, eager):
        scale = None
        if name.endswith("linears.1.bias"):
            scale = torch.cat([grads[name.removesuffix("bias") + "weight"].flatten(), e.flatten()])
        if not _close(r, e, rel, scale):
            off[name] = _relative(r, e)
    return off


def test_gradient_comparison_takes_summation_order_noise_and_catches_a_wrong_gradient() -> None:
    """The GPU graph test's rule, on CPU: fp32 gradients of the trimmed and the padded batch (the same
    function, other summation orders) agree to FP32_GRADIENT_RULE, key biases included; a gradient 1e-4 off
    does not."""
    cfg = preset("iu_xray")
    torch.manual_seed(0)
    model = R2GenModel(cfg.model, VOCAB).train()
    _no_dropout(model)
    feats, targets, masks = _batch(cfg, 4, 31, "cpu", 1)
    results = []
    for padded in (False, True):
        model.zero_grad(set_to_none=True)
        x = feats.detach().clone().requires_grad_()
        given = torch.nn.functional.pad(targets, (0, cfg.model.max_seq_length - 31)) if padded else targets
        masked_nll(model.forward_features(x, given)[:, :30], targets, masks, 100.0).backward()
        results.append(_grads(model, x))
    trimmed, padded = results
    names = [n for n, _ in model.encoder_decoder.named_parameters()] + ["visual features"]
    key_bias = names.index("model.decoder.layers.0.self_attn.linears.1.bias")
    weight = names.index("model.decoder.layers.0.self_attn.linears.1.weight")
    # Zero in exact arithmetic: its fp32 value is rounding noise of the key weights' gradient terms, a few
    # units of 2^-24 of their size (seen 6e-9 of it), which no relative test on its own scale can take.
    assert padded[key_bias].norm() <= 2.0**-16 * trimmed[weight].norm()
    # Seen: 2.5 units at most (the two batches share most kernels here); an error of 1e-4 (1700 units) is caught.
    assert _off_gradients(names, padded, trimmed, FP32_GRADIENT_RULE) == {}
    wrong = [g.clone() for g in padded]
    wrong[weight][0, 0] += 1e-4 * trimmed[weight].norm()
    wrong[key_bias] += 1e-4 * trimmed[weight].norm()
    assert set(_off_gradients(names, wrong, trimmed, FP32_GRADIENT_RULE)) == {names[weight], names[key_bias]}


@contextmanager
def _eager_and_graphed_twins(precision: str, method: str):
    """(cfg, backend, model, optimizer, twin, graphed): the iu_xray model on the GPU without speed-ups and its
    twin with `method` graphed, the same weights, dropout off, TF32 off, and cuDNN's own convolution choice for
    both (no autotuning, deterministic algorithms): autotuned, one twin may get an FFT or Winograd algorithm
    and the other not, whose fp32 error is another class than the summation order's FP32_GRADIENT_RULE (seen
    on an H100 while earlier tests' speed-ups left autotuning on process-wide: 7e-4 on every gradient).
    All restored after."""
    kept = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        cfg = preset("iu_xray")
        backend = PlainBackend("cuda", precision)
        torch.manual_seed(0)
        model, optimizer = prepare_model(backend, R2GenModel(cfg.model, VOCAB), cfg.without_speedups())
        model.train()
        _no_dropout(model)
        twin = R2GenModel(cfg.model, VOCAB).cuda().train()
        twin.load_state_dict(model.state_dict())
        _no_dropout(twin)
        yield cfg, backend, model, optimizer, twin, CudaGraphed.install(twin, method)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
         torch.backends.cudnn.deterministic) = kept


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_give_the_eager_outputs_and_gradients(precision: str) -> None:
    with _eager_and_graphed_twins(precision, "forward_features") as (cfg, backend, model, optimizer, twin, graphed):
        # Not run on a CPU-only machine. fp32 (TF32 off): FP32_GRADIENT_RULE, as the CPU test checks it; bf16:
        # 2e-2 = 5 units of bf16 roundoff (2^-8), autocast rounding each matrix product's output once.
        rel = FP32_GRADIENT_RULE if precision == "fp32" else 2e-2
        for step in range(3):  # later steps replay the graph after the weights changed
            window = [_batch(cfg, 6, 31 + step, "cuda", 10 * step + i) for i in range(2)]  # two micro-batches
            grads = []
            for m in (model, twin):
                m.zero_grad(set_to_none=True)
                for feats, targets, masks in window:
                    feats = feats.detach().clone().requires_grad_()  # each model's own input gradient
                    with backend.autocast():
                        logprobs = m.forward_features(feats, targets)
                    masked_nll(logprobs.float(), targets, masks, 100.0).backward()
                grads.append(_grads(m, feats))  # the window's parameter gradients, the last input's
            eager, replayed = grads
            names = [n for n, _ in model.encoder_decoder.named_parameters()] + ["visual features"]
            off = _off_gradients(names, replayed, eager, rel)
            assert not off, f"step {step}: relative errors {off}"
            with backend.autocast():
                a = model.forward_features(*window[0][:2])
                b = twin.forward_features(*window[0][:2])
            assert a.shape == b.shape and _close(b, a, rel), step
            # The eager model's update, copied into the twin's parameters in place (the graphs hold
            # their addresses): Adam's first steps move every weight by about lr * sign(gradient), which
            # would turn rounding-level gradient differences into different weights.
            optimizer.step()
            twin.load_state_dict(model.state_dict())
        assert graphed.captures == 1 and len(graphed.graphs) == 1  # one padded shape, replayed


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_whole_model_graphs_give_the_eager_outputs_gradients_and_batchnorm_statistics(precision: str) -> None:
    """The visual extractor inside the captured step: log-probabilities, every parameter's gradient (ResNet's
    included) and BatchNorm's running statistics as the eager model's, over three steps whose weights change
    in between, with the same bounds as the encoder-decoder's graphs (fp32 TF32 off: FP32_GRADIENT_RULE; bf16:
    2e-2). The capture's warm-up passes leave the running statistics as they were."""
    with _eager_and_graphed_twins(precision, "forward") as (cfg, backend, model, optimizer, twin, graphed):
        rel = FP32_GRADIENT_RULE if precision == "fp32" else 2e-2
        names = [n for n, _ in model.named_parameters()]
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            images = torch.randn(6, 2, 3, 96, 96, generator=g).cuda()
            _, targets, masks = _batch(cfg, 6, 31 + step, "cuda", step)
            grads, outs = [], []
            for m in (model, twin):
                m.zero_grad(set_to_none=True)
                with backend.autocast():
                    logprobs = m(images, targets)
                masked_nll(logprobs.float(), targets, masks).backward()
                outs.append(logprobs.detach())
                grads.append([p.grad.clone() for p in m.parameters()])
            assert outs[0].shape == outs[1].shape and _close(outs[1], outs[0], rel), step
            off = _off_gradients(names, grads[1], grads[0], rel)
            assert not off, f"step {step}: relative errors {off}"
            for (name, a), b in zip(model.named_buffers(), twin.buffers()):
                assert _close(b.float(), a.float(), rel), (step, name)
            optimizer.step()
            twin.load_state_dict(model.state_dict())  # in place: the graphs hold the parameters' addresses
        assert graphed.captures == 1 and len(graphed.graphs) == 1


@pytest.mark.gpu
@pytest.mark.slow
def test_every_speed_up_tracks_the_plain_path_for_100_steps_on_a_gpu(small_set: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """bf16 rounding, amplified by Adam over 100 steps, has no closed-form bound (the CPU twin,
    tests/test_fast_path.py, compares float64 runs step by step). Inside the graphs dropout draws other
    random numbers than the plain path's, so the yardstick is what other dropout draws do to the plain
    path with the same seed (the same weights, data order and crops): two more plain runs whose CUDA
    generator (dropout's only source) is reseeded after the loop's seeding, measured here on this GPU.
    The fast path's 10-step loss means must stay within twice the largest gap between any two of the
    three plain runs, and learn as the plain path does."""
    import r2gen.train as loop

    steps, seeded = 100, loop.seed_everything
    curves = {}
    for name, fast, draws in (("fast", True, None), ("plain", False, None), ("plain, draws 1", False, 1),
                              ("plain, draws 2", False, 2)):
        cfg = preset("tiny").replace(image_size=32, window_size=7, num_workers=0, log_every=1, val_every=0,
                                     beam_size=1, epochs=-(-steps // 3), seed=0)
        cfg = cfg if fast else cfg.without_speedups()
        # the same seed; only the CUDA generator (dropout masks) starts elsewhere
        monkeypatch.setattr(loop, "seed_everything", seeded if draws is None else
                            (lambda seed, d=draws: (seeded(seed), torch.cuda.manual_seed_all(seed + 1000 * d))))
        prep = prepare(cfg, PlainBackend("cuda", "bf16"), load_annotation(small_set), None)
        run = tmp_path / name.replace(" ", "-").replace(",", "")
        train(prep, run, Console(file=open("/dev/null", "w")))  # noqa: SIM115 - closed with the process
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r["train/loss"] for r in records if "train/loss" in r][:steps]
        if fast:
            captured = CudaGraphed.all_installed(prep.model)[0].captures
            release_graphs(prep.model)  # their memory pool goes now, not with a failed test's traceback
            assert captured >= 1  # the graphs were really used
        del prep
    assert all(len(curve) == steps for curve in curves.values())
    means = {name: [sum(c[s:s + 10]) / 10 for s in range(0, steps, 10)] for name, c in curves.items()}
    gap = lambda a, b: max(abs(x - y) for x, y in zip(means[a], means[b]))  # noqa: E731
    plains = ["plain", "plain, draws 1", "plain, draws 2"]
    spread = max(gap(a, b) for i, a in enumerate(plains) for b in plains[i + 1:])
    assert spread > 0, "other dropout draws changed nothing: the yardstick measured no spread"
    assert gap("fast", "plain") <= 2 * spread, (gap("fast", "plain"), spread, means)
    assert means["fast"][-1] < means["fast"][0] and means["plain"][-1] < means["plain"][0]


@pytest.mark.gpu
@pytest.mark.parametrize("tuned", [True, False])
def test_a_runs_autotuning_choice_holds_whatever_ran_before(tuned: bool) -> None:
    """cudnn.benchmark is process-wide: a model prepared for a run sets it to its configuration's (its plan's)
    choice, also where an earlier run in the process left the other one."""
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not tuned
        cfg = preset("tiny").replace(cudnn_benchmark=tuned)
        prepare_model(PlainBackend("cuda", "fp32"), R2GenModel(cfg.model, VOCAB), cfg)
        assert torch.backends.cudnn.benchmark is tuned
    finally:
        torch.backends.cudnn.benchmark = before


def test_cudnn_autotuning_turns_off_inside_and_restores_the_setting() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with cudnn_autotuning(False):
            assert torch.backends.cudnn.benchmark is False
            with cudnn_autotuning(True):  # an inner block cannot turn it back on
                assert torch.backends.cudnn.benchmark is False
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
        with cudnn_autotuning(True):
            assert torch.backends.cudnn.benchmark is True
        torch.backends.cudnn.benchmark = False
        with cudnn_autotuning(True):  # never turns on what the run left off
            assert torch.backends.cudnn.benchmark is False
        torch.backends.cudnn.benchmark = True
        with pytest.raises(RuntimeError):
            with cudnn_autotuning(False):
                raise RuntimeError("out of memory")
        assert torch.backends.cudnn.benchmark is True  # restored on an error too
    finally:
        torch.backends.cudnn.benchmark = before
