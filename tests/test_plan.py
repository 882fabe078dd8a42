"""Batch planning (faithful / throughput policies) and the Plan's JSON round trip."""

from __future__ import annotations

import json

import pytest

from launcher.hardware import HostFacts
from launcher.plan import Plan, plan_batch
from launcher.thresholds import Thresholds, plan_loader


@pytest.mark.parametrize("largest,world,micro,acc,eff", [(64, 1, 16, 1, 16), (5, 1, 5, 4, 20), (4, 1, 4, 4, 16),
                                                         (6, 2, 6, 2, 24), (1, 1, 1, 16, 16), (64, 4, 4, 1, 16)])
def test_faithful_keeps_the_effective_batch(largest: int, world: int, micro: int, acc: int, eff: int) -> None:
    b = plan_batch(largest, world, "faithful", 16, "linear", 5e-5, 1e-4)
    assert (b.micro_batch, b.accumulation, b.effective_batch) == (micro, acc, eff)
    if eff == 16:
        assert (b.lr_ve, b.lr_ed) == (5e-5, 1e-4) and b.reasons["lr"].startswith("unchanged")
    else:
        assert b.lr_ed == pytest.approx(1e-4 * eff / 16)


def test_throughput_grows_the_batch_and_scales_lr() -> None:
    b = plan_batch(64, 2, "throughput", 16, "sqrt", 5e-5, 1e-4)
    assert (b.micro_batch, b.accumulation, b.effective_batch) == (64, 1, 128)
    assert b.lr_ed == pytest.approx(1e-4 * (128 / 16) ** 0.5) and "sqrt" in b.reasons["lr"]
    none = plan_batch(64, 1, "throughput", 16, "none", 5e-5, 1e-4)
    assert none.lr_ed == 1e-4


@pytest.mark.parametrize("largest,train,world,micro,policy", [
    (737, 2100, 1, 65, "throughput"),    # 2100 // 32 = 65: an epoch keeps 33 steps
    (48, 2100, 1, 48, "throughput"),     # memory is the limit, an epoch keeps 44 steps
    (737, 280, 1, 16, "faithful"),       # 280 // 32 = 8 <= 16: no batch above R2Gen's keeps 32 steps
    (737, 14000, 2, 218, "throughput"),  # 14000 // (2 x 32)
    (10, 2100, 1, 10, "faithful"),       # not even R2Gen's batch fits: accumulate
])
def test_auto_grows_the_batch_only_while_an_epoch_keeps_enough_steps(largest, train, world, micro, policy) -> None:
    b = plan_batch(largest, world, "auto", 16, "sqrt", 5e-5, 1e-4, train, 32, 200)
    assert b.micro_batch == micro and b.reasons["micro_batch"].startswith(f"{micro}: auto: ")
    assert b.steps_per_epoch == -(-train // b.effective_batch)
    if policy == "throughput":
        assert b.accumulation == 1 and b.steps_per_epoch >= 32 and b.effective_batch == micro * world
        assert b.lr_ed == pytest.approx(1e-4 * (micro * world / 16) ** 0.5)
        # warm-up over one epoch's steps (at most 200), as the rates are scaled up
        assert b.warmup_steps == min(b.steps_per_epoch, 200) and b.warmup_steps > 0
    else:
        assert b.effective_batch == (16 if micro != 10 else 20) and b.warmup_steps in (0, b.steps_per_epoch)
    assert b.warning is None


def test_throughput_warns_when_an_epoch_keeps_few_steps_and_warms_up_at_most_max_warmup_steps() -> None:
    b = plan_batch(280, 1, "throughput", 16, "sqrt", 5e-5, 1e-4, 280, 32, 200)
    assert b.steps_per_epoch == 1 and b.warmup_steps == 1
    assert b.warning is not None and "1 optimizer step(s) per epoch of 280 studies" in b.warning
    long = plan_batch(64, 1, "throughput", 16, "sqrt", 5e-5, 1e-4, 64 * 500, 32, 200)
    assert long.warmup_steps == 200 and long.warning is None and "max_warmup_steps" in long.reasons["warmup"]
    same = plan_batch(16, 1, "throughput", 16, "sqrt", 5e-5, 1e-4, 2100, 32, 200)
    assert same.warmup_steps == 0 and same.reasons["warmup"].startswith("none")


def test_warmup_factor_is_linear_then_one_and_the_rates_come_back() -> None:
    import torch

    from r2gen.step import warmed_up, warmup_factor

    assert [warmup_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5}])
    w.grad = torch.ones(1)
    with warmed_up(opt, 0.25):
        assert opt.param_groups[0]["lr"] == 0.125
        opt.step()
    assert w.item() == -0.125 and opt.param_groups[0]["lr"] == 0.5  # exact: powers of two


def test_bad_policy_and_nothing_fits() -> None:
    with pytest.raises(ValueError, match="--batch-policy"):
        plan_batch(8, 1, "greedy", 16, "linear", 1e-4, 1e-4)
    with pytest.raises(ValueError, match="no micro-batch"):
        plan_batch(0, 1, "faithful", 16, "linear", 1e-4, 1e-4)


def test_plan_round_trips_through_json_and_has_a_reason_per_row() -> None:
    host = HostFacts(64, 40, 0, 0, 16)
    plan = Plan("plain", "cuda", "bf16", plan_batch(48, 1, "throughput", 16, "linear", 5e-5, 1e-4),
                plan_loader(host, Thresholds(), 1.0), 68.0, 61.2,
                {"backend": "plain: one GPU", "device": "cuda: 1 GPU visible", "precision": "bf16: supported"})
    assert Plan.from_json(plan.to_json()) == plan
    assert all(reason for _, _, reason in plan.rows())


# -- make_plan: facts, flags and probe results in, every decision out -----------------------------------
from launcher.hardware import Facts, GpuFacts  # noqa: E402
from launcher.auto import choose_auto_engine  # noqa: E402
from launcher.memory_model import ProbeResult  # noqa: E402
from backends.registry import check_engine_device, spec  # noqa: E402
from launcher.plan import PlanOptions, apply_plan, make_plan  # noqa: E402
from r2gen.config import preset  # noqa: E402
from r2gen.errors import BackendError, ConfigError  # noqa: E402

H100 = GpuFacts(0, "NVIDIA H100 80GB HBM3", (9, 0), 79.2, 78.6, 0.0)
SERVER = HostFacts(128, 120, 0, 0, 16)


def _probe(micro: int, fixed: float = 2.0, per_sample: float = 0.25) -> ProbeResult:
    return ProbeResult(gpu="NVIDIA H100 80GB HBM3", budget_gib=67.3, overhead_gib=0.5,
                       points=((4, fixed + 4 * per_sample), (8, fixed + 8 * per_sample)), fixed_gib=fixed,
                       per_sample_gib=per_sample, predicted=micro, micro_batch=micro,
                       peak_gib=fixed + per_sample * micro if micro else None,
                       tried=((1, True, 2.2), (4, True, 3.0), (8, True, 4.0), (micro, micro > 0, None)), seconds=21.0)


def test_throughput_plan_on_an_h100_from_the_probe() -> None:
    cfg = preset("iu_xray")
    facts = Facts((H100,), SERVER, "1 GPU(s) via NVML")
    choice = choose_auto_engine("bf16", 256, Thresholds(), speeds={"bf16": 400.0, "fp8": 390.0})
    plan = make_plan(choice.spec, "cuda", choice.precision, cfg, facts, Thresholds(),
                     PlanOptions(batch_policy="throughput"), studies=3955, probe=_probe(256), engine=choice.engine,
                     choice=choice)
    assert (plan.batch.micro_batch, plan.batch.accumulation, plan.batch.effective_batch) == (256, 1, 256)
    assert plan.backend == "plain" and plan.reasons["backend"].startswith("auto: plain")
    assert "fp8 390 vs bf16 400 samples/s (-3%)" in plan.reasons["backend"]
    assert plan.batch.lr_ed == pytest.approx(1e-4 * 4)  # sqrt(256 / 16)
    assert plan.memory_budget_gib == pytest.approx(79.2 * 0.85)
    assert plan.predicted_peak_gib == pytest.approx(2.0 + 0.25 * 256)
    assert "confirmed 256" in plan.reasons["probe"] and "85% of 79.2 GiB" in plan.reasons["memory"]
    assert plan.loader.pin_memory and plan.loader.num_workers == 15
    assert Plan.from_json(plan.to_json()) == plan
    cfg2 = apply_plan(cfg, plan)
    assert (cfg2.window_size, cfg2.micro_batch, cfg2.num_workers, cfg2.lr_ed) == (256, 256, 15, plan.batch.lr_ed)
    assert plan.cudnn_autotune is False and not cfg2.cudnn_benchmark and cfg.cudnn_benchmark  # 256 >= 48


@pytest.mark.parametrize("micro, speedups, expected", [(16, True, True), (47, True, True), (48, True, False),
                                                       (65, True, False), (16, False, False)])
def test_cudnn_autotuning_is_planned_by_the_micro_batch(micro: int, speedups: bool, expected: bool) -> None:
    """Tuned below thresholds' autotune_below_micro_batch (48), where it is faster per step; cuDNN's own choice
    at and above it; never under --no-speedups. The plan says why, and apply_plan hands the loop the choice."""
    cfg = preset("iu_xray") if speedups else preset("iu_xray").without_speedups()
    facts = Facts((H100,), SERVER, "1 GPU(s) via NVML")
    plan = make_plan(spec("plain"), "cuda", "bf16", cfg, facts, Thresholds(), PlanOptions(batch_policy="throughput"),
                     studies=3955, probe=_probe(micro))
    assert plan.batch.micro_batch == micro and plan.cudnn_autotune is expected
    assert apply_plan(cfg, plan).cudnn_benchmark is expected
    assert ("cudnn autotuning", "on" if expected else "off", plan.reasons["autotune"]) in plan.rows()
    assert plan.reasons["autotune"].startswith("on: " if expected else "off: ")
    assert Plan.from_json(plan.to_json()) == plan
    never = make_plan(spec("plain"), "cuda", "bf16", cfg, facts, Thresholds(autotune_below_micro_batch=0),
                      PlanOptions(batch_policy="throughput"), studies=3955, probe=_probe(micro))
    assert never.cudnn_autotune is False


def test_a_cpu_plan_and_an_older_plan_leave_autotuning_to_the_configuration() -> None:
    plan = make_plan(spec("plain"), "cpu", "fp32", preset("tiny"), Facts((), SERVER, "CPU only"), Thresholds(),
                     PlanOptions(), studies=40)
    assert plan.cudnn_autotune is None and "autotune" not in plan.reasons
    older = json.loads(plan.to_json())
    del older["cudnn_autotune"]  # plan.json of a run made before the field
    assert Plan.from_json(json.dumps(older)).cudnn_autotune is None
    assert apply_plan(preset("tiny"), plan).cudnn_benchmark == preset("tiny").cudnn_benchmark


def test_faithful_plan_on_a_laptop_accumulates() -> None:
    laptop = GpuFacts(0, "RTX 4060 Laptop", (8, 9), 8.0, 7.4, 0.3)
    facts = Facts((laptop,), HostFacts(16, 6, 2, 0, 8), "1 GPU(s) via NVML")
    plan = make_plan(spec("plain"), "cuda", "fp32", preset("iu_xray"), facts, Thresholds(), PlanOptions(),
                     studies=3955, probe=_probe(6))
    assert (plan.batch.micro_batch, plan.batch.accumulation, plan.batch.effective_batch) == (6, 3, 18)
    assert plan.memory_budget_gib == pytest.approx(8 * 0.85 - 0.3)
    assert "held by other processes" in plan.reasons["memory"]
    assert not plan.loader.pin_memory  # 6 GiB available < 8 GiB threshold


def test_max_vram_caps_the_budget_and_says_so() -> None:
    facts = Facts((H100,), SERVER, "")
    plan = make_plan(spec("plain"), "cuda", "bf16", preset("iu_xray"), facts, Thresholds(),
                     PlanOptions(max_vram_gib=8, target_util_pct=90), studies=400, probe=_probe(16))
    assert plan.memory_budget_gib == 8 and plan.reasons["memory"].startswith("--max-vram 8")
    assert apply_plan(preset("iu_xray"), plan).max_vram_gib == 8


def test_nothing_fits_and_unverified_batches() -> None:
    facts = Facts((H100,), SERVER, "")
    with pytest.raises(BackendError, match="a micro-batch of 1 does not fit"):
        make_plan(spec("plain"), "cuda", "fp32", preset("iu_xray"), facts, Thresholds(), PlanOptions(), 400, _probe(0))
    with pytest.raises(BackendError, match="--micro-batch 64 does not fit"):
        make_plan(spec("plain"), "cuda", "fp32", preset("iu_xray"), facts, Thresholds(),
                  PlanOptions(micro_batch=64, batch_policy="throughput"), 400, _probe(0))
    plan = make_plan(spec("plain"), "cuda", "fp32", preset("iu_xray"), facts, Thresholds(), PlanOptions(probe=False),
                     400, None)
    assert plan.batch.micro_batch == 16 and "--no-probe" in plan.reasons["probe"]
    with pytest.raises(BackendError, match="--device cuda"):
        make_plan(spec("plain"), "cuda", "fp32", preset("iu_xray"), Facts((), SERVER, "CPU only"), Thresholds(),
                  PlanOptions(), 400, None)


@pytest.mark.parametrize("kwargs,flag", [({"micro_batch": 0}, "--micro-batch"), ({"effective_batch": 0}, "--effective-batch"),
                                         ({"target_util_pct": 0}, "--target-util"), ({"max_vram_gib": -1}, "--max-vram"),
                                         ({"batch_policy": "x"}, "--batch-policy"), ({"lr_scaling": "x"}, "--lr-scaling"),
                                         ({"num_workers": -1}, "--num-workers")])
def test_plan_options_are_validated(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        PlanOptions(**kwargs)


def test_num_workers_flag_overrides_the_host_rule() -> None:
    plan = make_plan(spec("plain"), "cpu", "fp32", preset("tiny"), Facts((), SERVER, "CPU only"), Thresholds(),
                     PlanOptions(num_workers=0), 400, None)
    assert plan.loader.num_workers == 0 and not plan.loader.persistent_workers and plan.loader.prefetch_factor is None
    assert plan.loader.reasons["num_workers"] == "0: --num-workers"


def test_probe_cap_follows_the_policy() -> None:
    cfg = preset("iu_xray")
    assert PlanOptions(batch_policy="throughput").probe_cap(cfg, 2069) == 2069
    assert PlanOptions().probe_cap(cfg, 2069) == 16 and PlanOptions().probe_cap(cfg, 10) == 10
    assert PlanOptions(effective_batch=64).probe_cap(cfg, 2069, world_size=4) == 16
    assert PlanOptions(batch_policy="auto").probe_cap(cfg, 2100) == 65  # the most that keeps 32 steps
    assert PlanOptions(batch_policy="auto").probe_cap(cfg, 280) == 16


@pytest.mark.parametrize("micro,offload,speeds,expected", [
    (256, None, {"bf16": 400.0, "fp8": 440.0}, ("fp8", "fp8", {"fp8_impl": "auto"})),    # +10%: measured faster
    (256, None, {"bf16": 400.0, "fp8": 410.0}, ("plain", "bf16", {})),                    # +2.5%: not enough
    (256, None, {"bf16": 400.0, "fp8": None}, ("plain", "bf16", {})),                     # fp8 ran out of memory
    (256, None, None, ("plain", "bf16", {})),                                             # FP8 not possible here
    (3, 24, None, ("deepspeed", "bf16", {"zero": 2, "offload": "cpu"})),                  # states do not fit
    (3, 3, None, ("plain", "bf16", {})),                                                  # offload fits no more
])
def test_auto_engine_follows_measurements(micro, offload, speeds, expected) -> None:
    choice = choose_auto_engine("bf16", micro, Thresholds(), offload_micro=offload, speeds=speeds)
    assert (choice.backend, choice.precision, choice.engine) == expected
    assert choice.reason.startswith(expected[0])


def test_auto_thresholds_come_from_the_table() -> None:
    strict = Thresholds(fp8_min_speedup_pct=20, useful_micro_batch=2)
    assert choose_auto_engine("bf16", 256, strict, speeds={"bf16": 400.0, "fp8": 440.0}).backend == "plain"
    assert choose_auto_engine("bf16", 3, strict, offload_micro=24).backend == "plain"


@pytest.mark.parametrize("backend", ["deepspeed", "fp8"])
def test_gpu_engines_are_refused_on_a_cpu(backend: str) -> None:
    with pytest.raises(BackendError, match=f"{backend}: needs a CUDA GPU"):
        check_engine_device(spec(backend), "cpu")
    check_engine_device(spec(backend), "cuda")
    check_engine_device(spec("accelerate"), "cpu")


def test_several_accelerate_processes_on_a_cpu_are_refused() -> None:
    with pytest.raises(BackendError, match="--gpus 2: accelerate launch runs one process on a CPU"):
        check_engine_device(spec("accelerate"), "cpu", 2)
    check_engine_device(spec("accelerate"), "cuda", 2)
    check_engine_device(spec("plain"), "cpu", 2)


# -- disk: the run directory's free space against the checkpoints the run keeps at once ----------------
from launcher.plan import DiskSpace, checkpoints_held, disk_reason  # noqa: E402
from r2gen.checkpoint import checkpoint_bytes  # noqa: E402

GIB = 2**30


def test_a_checkpoint_is_fp32_weights_and_three_amsgrad_states() -> None:
    assert checkpoint_bytes(1000, 10, overhead_bytes=0) == 4 * 1010 + 4 * 3 * 1000
    assert checkpoint_bytes(1000, 0, optimizer_states=2, overhead_bytes=0) == 12_000  # Adam without AMSGrad
    assert checkpoint_bytes(1000, 0, weight_copies=2, overhead_bytes=0) == 20_000  # an engine's files + loop.pt
    assert checkpoint_bytes(75_000_000) == 1_200_000_000 + 2**20  # ~1.1 GiB: 75 M parameters


def test_the_run_holds_keep_last_plus_best_plus_one_being_written() -> None:
    assert [checkpoints_held(k) for k in (1, 3, 10)] == [3, 5, 12]


@pytest.mark.parametrize("free_gib,each_gib,keep,enough,advice", [
    (10.0, 1.0, 3, True, None),
    (5.0, 1.0, 3, True, None),                                    # exactly 5 fit
    (4.9, 1.0, 3, False, "lower --keep-last to 2"),               # 4 fit: keep 2 + best + 1 in flight
    (0.6, 1.2, 3, False, "free at least 3.0 GiB (--keep-last 1 needs 3.6 GiB)"),  # not even one
])
def test_disk_reason_counts_the_checkpoints(free_gib: float, each_gib: float, keep: int, enough: bool,
                                            advice: str | None) -> None:
    ok, why = disk_reason(DiskSpace("runs", int(free_gib * GIB), int(each_gib * GIB), keep))
    assert ok is enough
    assert f"{free_gib:.1f} GiB free in runs" in why and f"a checkpoint is ~{each_gib:.1f} GiB" in why
    assert f"keeps {keep} (--keep-last) + best.pt + 1 being written = {keep + 2}" in why
    if advice:
        assert why.startswith("too little:") and advice in why and "disk full" in why


def test_make_plan_checks_the_disk_against_keep_last_and_round_trips() -> None:
    facts = Facts((H100,), SERVER, "")
    disk = DiskSpace("runs", int(0.6 * GIB), int(1.2 * GIB))
    plan = make_plan(spec("plain"), "cuda", "bf16", preset("iu_xray").replace(keep_last=2), facts, Thresholds(),
                     PlanOptions(), studies=400, probe=_probe(16), disk=disk)
    assert plan.disk.keep_last == 2  # the run's --keep-last, not the fact's default
    decision, value, reason = plan.rows()[-1]
    assert (decision, value) == ("disk", "too little") and "keeps 2 (--keep-last)" in reason
    assert plan.disk_warning() == f"disk: {reason}"
    assert Plan.from_json(plan.to_json()) == plan
    roomy = make_plan(spec("plain"), "cuda", "bf16", preset("iu_xray"), facts, Thresholds(), PlanOptions(), studies=400,
                      probe=_probe(16), disk=DiskSpace("runs", 100 * GIB, GIB))
    assert roomy.rows()[-1][:2] == ("disk", "ok") and roomy.disk_warning() is None
    unchecked = make_plan(spec("plain"), "cuda", "bf16", preset("iu_xray"), facts, Thresholds(), PlanOptions(), studies=400,
                          probe=_probe(16))
    assert unchecked.disk is None and all(row[0] != "disk" for row in unchecked.rows())


def test_auto_says_why_fp8_was_not_timed() -> None:
    choice = choose_auto_engine("bf16", 65, Thresholds(), untimed="fp8 not timed: torchao only")
    assert choice.backend == "plain" and choice.reason.endswith("; fp8 not timed: torchao only")


def test_auto_starts_from_the_device_it_finds() -> None:
    """auto's choices before any measurement, in one place (launcher.auto.auto_start)."""
    from launcher.auto import AUTO_PRECISION_REASON, AutoStart, auto_start

    assert auto_start(True, True, 4, None) == AutoStart("cuda", "iu_xray", "bf16", 4)  # every visible GPU
    assert auto_start(True, False, 4, 2) == AutoStart("cuda", "iu_xray", "fp16", 2)  # no bfloat16; --gpus 2
    assert auto_start(False, False, 0, None) == AutoStart("cpu", "tiny", "fp32", 1)
    assert auto_start(False, False, 0, 2) == AutoStart("cpu", "tiny", "fp32", 2)  # gloo processes
    assert set(AUTO_PRECISION_REASON) == {"cuda", "cpu"}


def test_a_runs_probe_request_carries_its_budget_and_autotuning_rule() -> None:
    """ProbeRequest.for_run, the one way a new or continued run asks for the probe: the budget gpu_budget gives
    (85% of the card less what other processes hold), their share, and the autotuning threshold its candidate
    steps follow (the plan's rule, launcher.plan.autotunes)."""
    from launcher.plan import autotunes, gpu_budget
    from launcher.probe import ProbeRequest

    busy = GpuFacts(0, "NVIDIA H100 80GB HBM3", (9, 0), 79.2, 70.0, 6.0)
    facts, thresholds = Facts((busy,), SERVER, ""), Thresholds(autotune_below_micro_batch=20)
    request = ProbeRequest.for_run(facts, PlanOptions(), thresholds, preset("iu_xray"), 700, "bf16", 65,
                                   backend="deepspeed", engine={"zero": 2})
    assert request.budget_gib == gpu_budget(facts, PlanOptions(), thresholds)[0] == pytest.approx(79.2 * 0.85 - 6.0)
    assert (request.others_gib, request.max_micro, request.autotune_below) == (6.0, 65, 20)
    assert (request.backend, request.engine, request.spec) == ("deepspeed", {"zero": 2}, spec("deepspeed"))
    assert [autotunes(b, 20) for b in (19, 20, 65)] == [True, False, False]
    assert ProbeRequest(preset("iu_xray"), 700, "bf16", 60.0, 65).autotune_below == Thresholds().autotune_below_micro_batch
