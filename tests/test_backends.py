"""Backend adapters against the plain path: the same step gives the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from backends.registry import build_backend
from launcher.cli import app
from launcher.probe import synthetic_batch
from r2gen.build import optimizer_factory
from r2gen.config import preset
from r2gen.data.datasets import images_to_device
from r2gen.errors import BackendError
from r2gen.model.r2gen import R2GenModel, masked_nll, target_tokens
from r2gen.step import train_step


def _one_window(name: str, precision: str, device: str = "cpu") -> tuple[float, torch.Tensor]:
    # The rates the GPU bounds below are derived from (tiny's own, doubled since, overflow fp16 on a GPU).
    cfg = preset("tiny").replace(image_size=64, lr_ve=2e-3, lr_ed=1e-3)
    torch.manual_seed(0)
    model = R2GenModel(cfg.model, 50).eval()  # no dropout: both paths see the same function
    backend = build_backend(name, device, precision)
    model, optimizer = backend.prepare(model, optimizer_factory(cfg))
    batch = synthetic_batch(cfg, 50, 6)
    losses = [train_step(model, optimizer, backend, batch, cfg.clip_value, micro_batch=3)[0] for _ in range(2)]
    return losses[-1], torch.cat([p.detach().float().cpu().flatten() for p in backend.unwrap(model).parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_accelerate_matches_plain_on_cpu(precision: str) -> None:
    plain_loss, plain_weights = _one_window("plain", precision)
    acc_loss, acc_weights = _one_window("accelerate", precision)
    assert acc_loss == plain_loss
    assert torch.equal(acc_weights, plain_weights)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_accelerate_matches_plain_on_gpu(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not run on a CPU-only machine. Both engines run the same kernels on the same numbers (on the CPU:
    bitwise equal, above); on a GPU cuDNN may pick non-deterministic algorithms (atomic sums), whose
    rounding noise Adam's sign-like first steps would turn into lr-sized weight differences: pinned to
    deterministic ones. The bounds are then far above rounding and below what a real difference gives:
    two Adam steps move a weight by up to ~2 lr = 4e-3 (weights: 1e-3), a skipped step or unscaled
    clipping changes the loss by more than 1e-3."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    plain_loss, plain_weights = _one_window("plain", precision, "cuda")
    acc_loss, acc_weights = _one_window("accelerate", precision, "cuda")
    assert acc_loss == pytest.approx(plain_loss, rel=1e-3)
    torch.testing.assert_close(acc_weights, plain_weights, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["plain", "accelerate"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_optimizer_is_built_where_the_model_trains(name: str, device: str) -> None:
    """Every adapter builds the optimizer after moving the model, so the fused Adam is chosen for the
    device it steps on (build_optimizer), not for where the model happened to be built."""
    cfg = preset("tiny").replace(image_size=64)
    backend = build_backend(name, device, "bf16")
    seen = []
    factory = optimizer_factory(cfg)

    def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        seen.extend({p.device.type for p in model.parameters()})
        return factory(model)

    _, optimizer = backend.prepare(R2GenModel(cfg.model, 50), make_optimizer)
    assert seen == [device]
    assert getattr(optimizer, "optimizer", optimizer).defaults["fused"]  # Accelerate wraps the optimizer


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["plain", "accelerate"])
def test_an_fp16_overflow_is_a_skipped_step(name: str) -> None:
    """An overflowing fp16 step leaves the weights alone and is reported skipped (the metrics count it),
    also with the fused Adam, whose skip Accelerate's own flag misses; the next step is taken."""
    cfg = preset("tiny").replace(image_size=64)
    torch.manual_seed(0)
    backend = build_backend(name, "cuda", "fp16")
    model, optimizer = backend.prepare(R2GenModel(cfg.model, 50).eval(), optimizer_factory(cfg))
    assert getattr(optimizer, "optimizer", optimizer).defaults["fused"]
    batch = synthetic_batch(cfg, 50, 2)
    images = images_to_device(batch["images"], backend.device)
    targets, masks = batch["targets"].to(backend.device), batch["masks"].to(backend.device)

    def step(factor: float) -> bool:
        with backend.autocast():
            logprobs = model(images, targets)
        loss = masked_nll(logprobs.float(), targets, masks, target_tokens(masks)) * factor
        backend.backward(loss, model, last=True)
        return backend.step(model, optimizer, cfg.clip_value)

    weights = lambda: torch.cat([p.detach().flatten() for p in backend.unwrap(model).parameters()])
    before = weights()
    assert not step(1e30)  # its fp16 gradients overflow
    assert torch.equal(weights(), before)
    assert step(1.0) and not torch.equal(weights(), before)


def test_unknown_backend_and_cpu_fp16_are_refused() -> None:
    with pytest.raises(BackendError, match="--backend"):
        build_backend("megatron", "cpu", "fp32")
    with pytest.raises(BackendError, match="fp16"):
        build_backend("accelerate", "cpu", "fp16")


def test_accelerate_command_trains_the_tiny_preset_on_cpu(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["accelerate", "--preset", "tiny", "--device", "cpu", "--studies", "20",
                                      "--epochs", "2", "--beam-size", "1", "--effective-batch", "6",
                                      "--batch-size", "3", "--log-every", "1", "--run-dir", str(tmp_path),
                                      "--name", "acc"], terminal_width=250)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 2 * 3 and all(map(lambda v: v == v and v < 10, losses))  # finite, 14 studies / 6
    config = json.loads((tmp_path / "acc" / "config.json").read_text())
    assert config["backend"].startswith("accelerate on cpu") and config["train"]["micro_batch"] == 3
    plan = json.loads((tmp_path / "acc" / "plan.json").read_text())
    assert plan["backend"] == "accelerate" and plan["batch"]["accumulation"] == 2
