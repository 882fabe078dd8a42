"""auto's choices, in one place: where it starts before anything is measured (`auto_start`: device,
preset, precision, processes), its request (`auto_request`), what it measures beyond the plain probe
(`auto_engine`: ZeRO-2 CPU offload when too little fits, bf16 against FP8 where FP8 can run) and the engine
those measurements choose (`choose_auto_engine`, pure).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from launcher.thresholds import Thresholds

if TYPE_CHECKING:
    from backends.spec import EngineSpec
    from launcher.hardware import Facts
    from launcher.memory_model import ProbeResult
    from launcher.plan import PlanOptions
    from launcher.probe import ProbeRequest
    from launcher.request import RunRequest

TORCHAO_UNTIMED = ("fp8 not timed: without Transformer Engine only torchao's float8 is here, measured slower than "
                   "bf16 on R2Gen's small matrices (2026-12: 2.5-11x, by card and batch: an H200 at micro-batch 65, "
                   "59 vs 643 samples/s; an H100, 141 vs 396); `r2gen-launch fp8` runs it")
"""Why auto skips the bf16-vs-fp8 timing (24 s of a 3-minute run) when FP8 would be torchao's."""


@dataclass(frozen=True)
class EngineChoice:
    """auto's engine: backend, precision, engine options, and why."""

    backend: str
    precision: str
    engine: dict[str, Any]
    reason: str

    @property
    def spec(self) -> EngineSpec:
        """The chosen engine (the registry's, by the name the plan records)."""
        from backends.registry import spec

        return spec(self.backend)


MEASURED_FIRST = "plain"
"""The engine auto probes first; its measurements choose the run's (choose_auto_engine)."""


def measured_first() -> EngineSpec:
    from backends.registry import spec

    return spec(MEASURED_FIRST)


AUTO_PRECISION_REASON = {"cuda": "bf16 where the GPU supports it, else fp16", "cpu": "fp32 on a CPU"}


@dataclass(frozen=True)
class AutoStart:
    """auto's starting point, before anything is measured: device, preset, precision and processes."""

    device: str
    preset: str
    precision: str
    processes: int


def auto_start(cuda: bool, bf16_supported: bool, visible_gpus: int, gpus: int | None) -> AutoStart:
    """On a GPU the paper's iu_xray preset in bf16 (fp16 where the GPU has no bfloat16) on `gpus`, else
    every visible GPU; on a CPU-only machine the tiny preset in fp32 (AUTO_PRECISION_REASON says why)."""
    if cuda:
        return AutoStart("cuda", "iu_xray", "bf16" if bf16_supported else "fp16",
                         gpus if gpus is not None else visible_gpus)
    return AutoStart("cpu", "tiny", "fp32", gpus or 1)


def choose_auto_engine(precision: str, micro: int, thresholds: Thresholds, offload_micro: int | None = None,
                       speeds: dict[str, float | None] | None = None, untimed: str = "") -> EngineChoice:
    """From measurements only: `micro` is the largest micro-batch of the plain engine in `precision`,
    `offload_micro` DeepSpeed ZeRO-2 + CPU offload's (measured when `micro` was not useful), `speeds`
    samples/s of short runs of `precision` and "fp8" at the same micro-batch (None: not measured or
    out of memory); `untimed` says why FP8 was not timed, where it could run."""
    useful = thresholds.useful_micro_batch
    if micro < useful:
        if offload_micro is not None and offload_micro > micro:
            return EngineChoice("deepspeed", precision, {"zero": 2, "offload": "cpu"},
                                f"deepspeed ZeRO-2 + CPU offload: with optimizer states on the GPU only {micro} "
                                f"studies fit per micro-batch (useful: {useful}); offloading them fits {offload_micro}")
        why = f"{micro} studies per micro-batch" + (f"; ZeRO-2 CPU offload fits no more ({offload_micro})"
                                                   if offload_micro is not None else "")
        return EngineChoice("plain", precision, {}, f"plain: {why}")
    base = (speeds or {}).get(precision)
    fp8 = (speeds or {}).get("fp8")
    if base and fp8:
        gain = (fp8 / base - 1) * 100
        measured = f"measured fp8 {fp8:.0f} vs {precision} {base:.0f} samples/s ({gain:+.0f}%)"
        if gain >= thresholds.fp8_min_speedup_pct:
            return EngineChoice("fp8", "fp8", {"fp8_impl": "auto"}, f"fp8: {measured}")
        return EngineChoice("plain", precision, {}, f"plain: states fit on the GPU; {measured}, under the "
                                                    f"{thresholds.fp8_min_speedup_pct:g}% needed")
    return EngineChoice("plain", precision, {}, "plain: model and optimizer states fit on the GPU "
                        f"({micro} studies per micro-batch)" + ("" if speeds is None else "; fp8 did not run")
                        + (f"; {untimed}" if untimed else ""))


def auto_request(options: PlanOptions, gpus: int | None, keep_training: bool, **asked: Any) -> RunRequest:
    """`r2gen-launch auto`'s request: auto_start on this machine (said on one line), its processes (with
    --keep-training and no --gpus, the continued run's own); `asked` the request's other fields as given."""
    import torch

    from launcher.console import err
    from launcher.options import make_topology
    from launcher.request import RunRequest

    cuda = torch.cuda.is_available()
    start = auto_start(cuda, cuda and torch.cuda.is_bf16_supported(), torch.cuda.device_count() if cuda else 0, gpus)
    err.print(f"auto: {start.device}, {start.precision}, {start.preset} preset, {start.processes} process(es)",
              highlight=False)
    topology = make_topology(gpus if keep_training else start.processes, 1, 0, "127.0.0.1", None, keep_training)
    return RunRequest(None, start.device, start.precision, start.preset, options, topology=topology,
                      keep_training=keep_training, **asked)


def auto_engine(request: ProbeRequest, probe: ProbeResult, facts: Facts, thresholds: Thresholds
                ) -> tuple[EngineChoice, ProbeResult]:
    """auto's measurements beyond the plain probe: ZeRO-2 CPU offload when too little fits, a short
    bf16-vs-fp8 timing where FP8 can run. Returns (EngineChoice, the probe of the chosen engine)."""
    from backends.fp8 import MIN_CAPABILITY, installed
    from launcher.console import status
    from launcher.probe import in_subprocess, measure_speeds, probe_in_subprocess

    micro = probe.micro_batch
    if micro < 1:
        return choose_auto_engine(request.precision, micro, thresholds), probe
    if micro < thresholds.useful_micro_batch:
        offload = replace(request, backend="deepspeed", engine={"zero": 2, "offload": "cpu"})
        with status("probing DeepSpeed ZeRO-2 with CPU offload..."):
            offload_probe = probe_in_subprocess(offload)
        choice = choose_auto_engine(request.precision, micro, thresholds, offload_probe.micro_batch)
        return choice, offload_probe if choice.backend == offload.backend else probe
    speeds, untimed = None, ""
    if request.precision == "bf16" and facts.gpus[0].capability >= MIN_CAPABILITY:
        if installed("transformer_engine"):
            engines = (("plain", "bf16", {}), ("fp8", "fp8", {"fp8_impl": "te"}))
            with status(f"timing bf16 against fp8 at micro-batch {micro}..."):
                speeds = in_subprocess(measure_speeds, request, engines, micro)
        elif installed("torchao"):
            untimed = TORCHAO_UNTIMED
    return choose_auto_engine(request.precision, micro, thresholds, speeds=speeds, untimed=untimed), probe
