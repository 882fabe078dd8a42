"""The real memory probe and out-of-memory recovery on a GPU (marked gpu: skipped on CPU)."""

from __future__ import annotations

import pytest
import torch

from backends.plain import PlainBackend
from launcher.probe import ProbeRequest, probe_in_subprocess, run_probe, synthetic_batch
from r2gen.build import optimizer_factory
from r2gen.config import preset
from r2gen.model.r2gen import R2GenModel
from r2gen.step import OomRecovery, cap_gpu_memory
from r2gen.units import GIB

pytestmark = pytest.mark.gpu
VOCAB = 760  # IU X-Ray's vocabulary size with R2Gen's threshold of 3


def _request(budget_gib: float, max_micro: int = 64, verify: int = 0, precision: str = "bf16") -> ProbeRequest:
    return ProbeRequest(preset("iu_xray"), VOCAB, precision, budget_gib, max_micro, verify=verify)


def test_probe_finds_a_micro_batch_that_trains_and_cleans_up() -> None:
    before = torch.cuda.memory_allocated()
    result = run_probe(_request(budget_gib=10))
    # Nothing of the probe is left behind (the model alone is 0.3 GiB); cuBLAS keeps its workspaces.
    assert torch.cuda.memory_allocated() - before <= 128 * 2**20
    assert 1 <= result.micro_batch <= 64 and result.peak_gib is not None and result.peak_gib <= 10
    assert result.seconds < 120
    tried = [b for b, *_ in result.tried]
    assert tried[:2] == [1, 64]  # the cap (up to CAP_FIRST_MAX) right after the warm-up
    if result.micro_batch < 64:  # (64 at 10 GiB does not fit in bf16: ~12.7 GiB on an H200) the fit below it
        assert tried[2:5] == [4, 8, 16] and result.fixed_gib is not None and result.per_sample_gib > 0

    # Training at the probed micro-batch under the same cap does not run out of memory.
    cap_gpu_memory(torch.device("cuda"), 10)
    try:
        backend = PlainBackend("cuda", "bf16")
        model = R2GenModel(preset("iu_xray").model, VOCAB)
        model, optimizer = backend.prepare(model, optimizer_factory(preset("iu_xray")))
        guard = OomRecovery(result.micro_batch, retries=0, wait_s=0)
        for _ in range(3):
            guard.step(model, optimizer, backend, synthetic_batch(preset("iu_xray"), VOCAB, result.micro_batch), 0.1)
        assert guard.recoveries == 0
    finally:
        del model, optimizer
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_verify_mode_and_a_budget_too_small() -> None:
    ok = run_probe(_request(budget_gib=10, verify=4))
    assert ok.micro_batch == 4 and [b for b, *_ in ok.tried] == [4]
    too_big = run_probe(_request(budget_gib=6, verify=512))
    assert too_big.micro_batch == 0
    nothing = run_probe(_request(budget_gib=0.3))
    assert nothing.micro_batch == 0


def test_probe_in_a_subprocess_leaves_this_process_untouched() -> None:
    """Run in this process (run_probe), the probe's real steps would raise its peak allocation by gigabytes,
    even after they freed everything: the peak, not only what stays reserved, tells where they ran."""
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated()
    result = probe_in_subprocess(_request(budget_gib=8, max_micro=16))
    assert result.micro_batch >= 1 and result.tried
    assert (torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated()) == before


def test_real_out_of_memory_is_recovered_with_a_smaller_micro_batch() -> None:
    cfg = preset("iu_xray")
    cap_gpu_memory(torch.device("cuda"), 5)
    torch.cuda.reset_peak_memory_stats()
    try:
        backend = PlainBackend("cuda", "fp32")
        model = R2GenModel(cfg.model, VOCAB)
        model, optimizer = backend.prepare(model, optimizer_factory(cfg))
        guard = OomRecovery(64, retries=0, wait_s=0)
        loss, stepped = guard.step(model, optimizer, backend, synthetic_batch(cfg, VOCAB, 64), cfg.clip_value)
        assert stepped and loss > 0 and guard.recoveries >= 1 and guard.micro_batch < 64
        assert torch.cuda.max_memory_reserved() <= 5 * GIB
    finally:
        del model, optimizer
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_deepspeed_probe_survives_out_of_memory_and_auto_measures_fp8() -> None:
    """In a subprocess (DeepSpeed's process group stays out of this one): a budget that makes the
    search run out of memory; the probe starts a fresh engine after each and still answers."""
    from dataclasses import replace

    from launcher.probe import in_subprocess, measure_speeds

    # The budget comes from this machine's own numbers (DeepSpeed's memory outside torch's allocator
    # differs between GPUs and drivers): a roomy probe measures the peaks, then a budget at their line's
    # value for 10 studies: the ladder's 16 runs out of memory (a budget at 18 studies let 1-18 all fit).
    request = replace(_request(budget_gib=20, max_micro=32), backend="deepspeed", engine={"zero": 2, "offload": "cpu"})
    roomy = probe_in_subprocess(request)
    peaks = {b: peak for b, fits, peak in roomy.tried if fits and peak is not None}  # the warm-up's too
    assert len(peaks) >= 2, roomy.tried
    low, high = min(peaks), max(peaks)
    at_ten = peaks[low] + (peaks[high] - peaks[low]) * (10 - low) / (high - low)  # the peaks' line at 10 studies
    result = probe_in_subprocess(replace(request, budget_gib=at_ten, max_micro=256))
    assert any(not fits for _, fits, _ in result.tried) and result.micro_batch >= 1, result.tried
    if torch.cuda.get_device_capability() >= (8, 9):
        speeds = in_subprocess(measure_speeds, _request(budget_gib=20),
                               (("plain", "bf16", {}), ("fp8", "fp8", {"fp8_impl": "torchao"})), 16)
        assert speeds["bf16"] > 0 and speeds["fp8"] > 0


@pytest.mark.slow
def test_auto_measures_deepspeed_offload_when_too_little_fits(tmp_path) -> None:
    """auto's engine choice end to end (launcher.auto.auto_engine): under a 6 GiB --max-vram and a
    useful_micro_batch no card reaches, the plain probe's micro-batch is not useful, so auto probes
    DeepSpeed ZeRO-2 with CPU offload in a subprocess and decides from both measurements."""
    import re

    from typer.testing import CliRunner

    from launcher.cli import app

    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("useful_micro_batch: 100000\n")
    result = CliRunner().invoke(app, ["auto", "--max-vram", "6", "--thresholds", str(thresholds), "--dry-run",
                                      "--run-dir", str(tmp_path / "runs")], terminal_width=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert re.search(r"auto: (deepspeed ZeRO-2 \+ CPU offload: .* offloading them fits \d+|plain: \d+ studies per "
                     r"micro-batch; ZeRO-2 CPU offload fits no more \(\d+\))", text), text[-2000:]
