"""The Plan: every decision the launcher makes for a run, with the reason a user reads.

Pure: built from hardware facts, thresholds and probe results (plain values), serialized to
plan.json in the run directory, and read back by --keep-training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from launcher.auto import AUTO_PRECISION_REASON
from launcher.hardware import Facts
from launcher.memory_model import LR_SCALING, ProbeResult, accumulation_steps, memory_budget_gib, scale_lr
from launcher.thresholds import LoaderPlan, Thresholds, decoded_size_gib, plan_loader
from r2gen.config import TrainConfig
from r2gen.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from backends.spec import EngineSpec
    from launcher.auto import EngineChoice

USER_MICRO_BATCH = "--micro-batch"
"""The micro-batch's reason in a plan when the user fixed it (runs before the rename say --batch-size)."""

BATCH_POLICIES = ("auto", "faithful", "throughput")


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int          # studies per forward/backward on one process
    accumulation: int         # micro-batches per optimizer step
    world_size: int
    effective_batch: int      # studies per optimizer step, all processes together
    lr_ve: float
    lr_ed: float
    reasons: dict[str, str]
    warmup_steps: int = 0     # optimizer steps of linear learning-rate warm-up (after a scaled-up rate)
    steps_per_epoch: int | None = None  # optimizer steps per epoch (None: the train split's size not known)
    warning: str | None = None  # printed before the run: an epoch with few optimizer steps


def steps_per_epoch(train_studies: int, effective_batch: int) -> int:
    """Optimizer steps in one epoch of `train_studies` (the last window shorter)."""
    return -(-train_studies // effective_batch)


def plan_batch(largest_micro: int, world_size: int, policy: str, effective_batch: int, lr_scaling: str,
               lr_ve: float, lr_ed: float, train_studies: int | None = None, min_steps_per_epoch: int = 32,
               max_warmup_steps: int = 200) -> BatchPlan:
    """Micro-batch, accumulation, learning rates and warm-up from the largest micro-batch that fits.

    faithful: keep `effective_batch` (R2Gen's 16) exactly or, when it is not a multiple of
    micro x world, as the nearest larger one; learning rates unchanged. throughput: one micro-batch
    per step at the largest size, learning rates scaled from `effective_batch` by `lr_scaling`.
    auto (time to a good model): throughput, but at no micro-batch so large that an epoch of
    `train_studies` keeps fewer than `min_steps_per_epoch` optimizer steps; where that leaves no
    batch above `effective_batch`, faithful. A scaled-up learning rate warms up linearly over one
    epoch's steps (at most `max_warmup_steps`).
    """
    if policy not in BATCH_POLICIES:
        raise ValueError(f"--batch-policy: unknown {policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
    if largest_micro < 1:
        raise ValueError("no micro-batch fits in memory")
    share = -(-effective_batch // world_size)  # one process's share of the effective batch
    auto_why = ""
    if policy == "auto":
        cap = train_studies // (world_size * min_steps_per_epoch) if train_studies else largest_micro
        if min(largest_micro, cap) > share:
            micro = min(largest_micro, cap)
            auto_why = (f"auto: the largest that fits is {largest_micro}" + (
                f", capped at {cap} so that an epoch of {train_studies} studies keeps >= {min_steps_per_epoch} "
                "optimizer steps (thresholds: min_steps_per_epoch)" if cap < largest_micro else ""))
            policy, largest_micro = "throughput", micro
        else:
            auto_why = (f"auto: faithful, as a batch above {effective_batch} would leave an epoch of {train_studies} "
                        f"studies fewer than {min_steps_per_epoch} optimizer steps (thresholds: min_steps_per_epoch)"
                        if cap <= share else f"auto: faithful, as no more than {largest_micro} studies fit")
            policy = "faithful"
    reasons: dict[str, str] = {}
    if policy == "faithful":
        # No use in a micro-batch larger than one process's share of the effective batch.
        micro = min(largest_micro, share)
        accumulation = accumulation_steps(effective_batch, micro, world_size)
        effective = micro * world_size * accumulation
        reasons["micro_batch"] = (f"{micro}: largest that fits is {largest_micro}, one process's share of the "
                                  f"effective batch {effective_batch} is {share}")
        reasons["accumulation"] = (f"{accumulation}: ceil({effective_batch} / ({micro} x {world_size} process(es)))")
        reasons["effective_batch"] = (f"{effective}: faithful to {effective_batch}" if effective == effective_batch
                                      else f"{effective}: nearest multiple of {micro} x {world_size} above {effective_batch}")
        new_ve, new_ed = lr_ve, lr_ed
        reasons["lr"] = "unchanged: the effective batch is kept"
        if effective != effective_batch:
            new_ve = scale_lr(lr_ve, effective_batch, effective, lr_scaling)
            new_ed = scale_lr(lr_ed, effective_batch, effective, lr_scaling)
            reasons["lr"] = f"scaled {lr_scaling} by {effective}/{effective_batch}"
    else:
        micro, accumulation = largest_micro, 1
        effective = micro * world_size
        reasons["micro_batch"] = f"{micro}: the largest that fits the memory budget"
        reasons["accumulation"] = "1: throughput policy steps after every micro-batch"
        reasons["effective_batch"] = f"{effective}: {micro} x {world_size} process(es) (preset: {effective_batch})"
        new_ve = scale_lr(lr_ve, effective_batch, effective, lr_scaling)
        new_ed = scale_lr(lr_ed, effective_batch, effective, lr_scaling)
        reasons["lr"] = ("unchanged: the effective batch is the preset's" if effective == effective_batch else
                         f"scaled {lr_scaling} by {effective}/{effective_batch}: visual extractor {lr_ve:g} -> "
                         f"{new_ve:.3g}, encoder-decoder {lr_ed:g} -> {new_ed:.3g}")
    if auto_why:
        reasons["micro_batch"] = f"{micro}: {auto_why}"
    steps = steps_per_epoch(train_studies, effective) if train_studies else None
    warmup = 0
    if new_ve > lr_ve or new_ed > lr_ed:
        warmup = min(steps or max_warmup_steps, max_warmup_steps)
        reasons["warmup"] = (f"{warmup} steps: the learning rates are scaled up, reached linearly over "
                             + ("one epoch" if warmup == steps else f"{max_warmup_steps} steps (thresholds: "
                                "max_warmup_steps)"))
    else:
        reasons["warmup"] = "none: the learning rates are not scaled up"
    warning = None
    if steps is not None and steps < min_steps_per_epoch and effective > effective_batch:
        warning = (f"batch: an effective batch of {effective} leaves {steps} optimizer step(s) per epoch of "
                   f"{train_studies} studies (fewer than min_steps_per_epoch {min_steps_per_epoch}): the model learns "
                   "little per epoch; --batch-policy auto keeps enough steps")
    return BatchPlan(micro, accumulation, world_size, effective, new_ve, new_ed, reasons, warmup, steps, warning)


@dataclass(frozen=True)
class PlanOptions:
    """The planning flags of every training command, validated on construction."""

    micro_batch: int | None = None        # --micro-batch: chosen by the user, verified not searched
    probe: bool = True                    # --no-probe turns it off (the micro-batch is then not verified)
    target_util_pct: float | None = None  # --target-util [default: thresholds' target_util_pct]
    max_vram_gib: float | None = None     # --max-vram: hard cap on this run's GPU memory
    effective_batch: int | None = None    # --effective-batch [default: the preset's batch]
    batch_policy: str = "faithful"        # --batch-policy
    lr_scaling: str = "sqrt"              # --lr-scaling
    num_workers: int | None = None        # --num-workers overrides the host rule

    def __post_init__(self) -> None:
        for flag, value in (("--micro-batch", self.micro_batch), ("--effective-batch", self.effective_batch)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag}: must be at least 1, got {value}")
        if self.target_util_pct is not None and not 0 < self.target_util_pct <= 100:
            raise ConfigError(f"--target-util: must be a percentage in (0, 100], got {self.target_util_pct}")
        if self.max_vram_gib is not None and not self.max_vram_gib > 0:
            raise ConfigError(f"--max-vram: must be a positive number of GiB, got {self.max_vram_gib}")
        if self.batch_policy not in BATCH_POLICIES:
            raise ConfigError(f"--batch-policy: unknown {self.batch_policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
        if self.lr_scaling not in LR_SCALING:
            raise ConfigError(f"--lr-scaling: unknown {self.lr_scaling!r}; choose one of {', '.join(LR_SCALING)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers: must not be negative, got {self.num_workers}")

    def probe_cap(self, cfg: TrainConfig, train_studies: int, world_size: int = 1, min_steps_per_epoch: int = 32
                  ) -> int:
        """The largest micro-batch worth probing: the train split (throughput), one process's share of
        the effective batch (faithful), or the largest that keeps `min_steps_per_epoch` (auto)."""
        if self.batch_policy == "throughput":
            return train_studies
        share = min(-(-self.effective_for(cfg) // world_size), train_studies)
        if self.batch_policy == "auto":  # no batch beyond plan_batch's cap for steps per epoch
            return max(train_studies // (world_size * min_steps_per_epoch), share)
        return share

    def effective_for(self, cfg: TrainConfig) -> int:
        """The effective batch for this preset; checks --micro-batch against it."""
        effective = self.effective_batch or cfg.window_size
        if self.micro_batch and self.micro_batch > effective and self.batch_policy == "faithful":
            raise ConfigError(f"--micro-batch {self.micro_batch} is larger than the effective batch {effective} "
                              "under --batch-policy faithful (raise --effective-batch or use throughput)")
        return effective


@dataclass(frozen=True)
class DiskSpace:
    """Where the run writes its checkpoints: free bytes there when planning (a fact gathered at the
    edge: shutil.disk_usage), one resumable checkpoint's bytes (r2gen.checkpoint.checkpoint_bytes)
    and how many the run keeps (--keep-last)."""

    folder: str
    free_bytes: int
    checkpoint_bytes: int
    keep_last: int = 3


def checkpoints_held(keep_last: int) -> int:
    """The most checkpoints on disk at once: the newest `keep_last` resumable states, best.pt (a hard
    link to one of them, free until that state is pruned, then it alone holds the data) and the one
    being written (atomic: complete before the oldest is removed)."""
    return keep_last + 2


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def disk_reason(disk: DiskSpace) -> tuple[bool, str]:
    """(whether the free space holds every checkpoint the run keeps at once, the sentence to read)."""
    keep_last = disk.keep_last
    held, each = checkpoints_held(keep_last), disk.checkpoint_bytes
    what = (f"{_gib(disk.free_bytes)} free in {disk.folder}, a checkpoint is ~{_gib(each)} and the run keeps "
            f"{keep_last} (--keep-last) + best.pt + 1 being written = {held} ({_gib(held * each)})")
    if disk.free_bytes >= held * each:
        return True, what
    fits = disk.free_bytes // each if each > 0 else held
    advice = (f"free space or lower --keep-last to {fits - 2}" if fits >= checkpoints_held(1)
              else f"free at least {_gib(checkpoints_held(1) * each - disk.free_bytes)} (--keep-last 1 needs "
                   f"{_gib(checkpoints_held(1) * each)})")
    return False, f"too little: {what}; {advice}, or the run stops with 'disk full' at a checkpoint"


@dataclass(frozen=True)
class Plan:
    backend: str
    device: str
    precision: str
    batch: BatchPlan
    loader: LoaderPlan
    memory_budget_gib: float | None   # None on CPU
    predicted_peak_gib: float | None
    reasons: dict[str, str]           # backend, device, precision, probe
    max_vram_gib: float | None = None
    probe: ProbeResult | None = None  # the probe's measurements (None: not probed)
    engine: dict[str, Any] = field(default_factory=dict)  # engine options: zero, offload (deepspeed); fp8_impl
    disk: DiskSpace | None = None     # free space for checkpoints when planned (None: not checked)
    visual_weights: str = ""          # where the visual extractor's weights came from ("" for a fine-tune)
    cudnn_autotune: bool | None = None  # cuDNN autotuning on a GPU (None: a CPU, or a plan from before it was planned)

    @property
    def spec(self) -> EngineSpec:
        """The plan's engine (the registry's, by the name plan.json stores)."""
        from backends.registry import spec

        return spec(self.backend)

    def disk_warning(self) -> str | None:
        """The sentence to print before the run when its checkpoints will not fit the free space."""
        if self.disk is None:
            return None
        enough, why = disk_reason(self.disk)
        return None if enough else f"disk: {why}"

    def warnings(self) -> list[str]:
        """Every sentence to print before the run: too little disk, an epoch with few optimizer steps."""
        return [w for w in (self.batch.warning, self.disk_warning()) if w]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        return cls(**{**data, "batch": BatchPlan(**data["batch"]), "loader": LoaderPlan(**data["loader"]),
                      "probe": ProbeResult.from_dict(data["probe"]) if data.get("probe") else None,
                      "disk": DiskSpace(**data["disk"]) if data.get("disk") else None})

    def rows(self) -> list[tuple[str, str, str]]:
        """(decision, value, reason) rows for the console table."""
        rows = [(k, str(getattr(self, k)), self.reasons.get(k, "")) for k in ("backend", "device", "precision")]
        if self.engine:
            rows.append(("engine options", ", ".join(f"{k} {v}" for k, v in self.engine.items()),
                         self.reasons.get("engine", "")))
        b, lo = self.batch, self.loader
        rows += [("micro_batch", str(b.micro_batch), b.reasons["micro_batch"]),
                 ("accumulation", str(b.accumulation), b.reasons["accumulation"]),
                 ("effective_batch", str(b.effective_batch), b.reasons["effective_batch"]),
                 ("lr (visual / rest)", f"{b.lr_ve:.3g} / {b.lr_ed:.3g}", b.reasons["lr"])]
        if "warmup" in b.reasons:
            rows.append(("warm-up steps", str(b.warmup_steps), b.reasons["warmup"]))
        if b.steps_per_epoch is not None:
            rows.append(("steps per epoch", str(b.steps_per_epoch), b.warning or "optimizer steps in one epoch"))
        rows += [(k, str(getattr(lo, k)), lo.reasons.get(k, ""))
                 for k in ("num_workers", "pin_memory", "persistent_workers", "cache_images", "low_memory")]
        if self.memory_budget_gib is not None:
            peak = f"{self.predicted_peak_gib:.1f} GiB" if self.predicted_peak_gib is not None else "unknown"
            rows.append(("memory budget GiB", f"{self.memory_budget_gib:.1f}",
                         f"{self.reasons.get('memory', '')}; peak at the micro-batch {peak}"))
        if "probe" in self.reasons:
            rows.append(("probe", "on" if self.probe else "off", self.reasons["probe"]))
        if self.cudnn_autotune is not None:
            rows.append(("cudnn autotuning", "on" if self.cudnn_autotune else "off", self.reasons["autotune"]))
        if self.disk is not None:
            enough, why = disk_reason(self.disk)
            rows.append(("disk", "ok" if enough else "too little", why))
        if self.visual_weights:
            rows.append(("visual weights", self.visual_weights, self.reasons.get("visual_weights", "")))
        return rows


def gpu_budget(facts: Facts, options: PlanOptions, thresholds: Thresholds, device_index: int = 0
               ) -> tuple[float, str]:
    """GiB this run may hold on its GPU, and why: target share of the card, --max-vram, minus others."""
    gpu = facts.gpus[device_index]
    target = options.target_util_pct if options.target_util_pct is not None else thresholds.target_util_pct
    budget = memory_budget_gib(gpu.total_gib, gpu.used_by_others_gib, target, options.max_vram_gib)
    why = f"{target:g}% of {gpu.total_gib:.1f} GiB ({gpu.name})"
    if options.max_vram_gib is not None and options.max_vram_gib < gpu.total_gib * target / 100:
        why = f"--max-vram {options.max_vram_gib:g} GiB"
    if gpu.used_by_others_gib > 0.05:
        why += f" minus {gpu.used_by_others_gib:.1f} GiB held by other processes"
    return budget, why


def make_plan(backend: EngineSpec, device: str, precision: str, cfg: TrainConfig, facts: Facts, thresholds: Thresholds,
              options: PlanOptions, studies: int, probe: ProbeResult | None = None,
              world_size: int = 1, engine: dict[str, Any] | None = None, choice: EngineChoice | None = None,
              disk: DiskSpace | None = None, train_studies: int | None = None) -> Plan:
    """Every decision of a run from plain values: hardware facts, thresholds, flags, probe results.

    `studies` sizes the image cache (all splits); `train_studies` (the train split) the optimizer steps
    per epoch, which --batch-policy auto keeps at thresholds.min_steps_per_epoch or more. `probe` is the ProbeResult when the probe ran (or verified
    --micro-batch), None otherwise. `backend` is the engine's spec; `choice` auto's engine choice (backend, precision and engine agree with it).
    `disk`: the run directory's free space and one checkpoint's size, checked against --keep-last.
    """
    effective = options.effective_for(cfg)
    reasons = {"backend": f"{backend.name}: as asked",
               "device": f"{device}: " + (facts.gpus[0].name if device == "cuda" and facts.gpus else facts.gpu_note),
               "precision": f"{precision}: as asked"}
    if choice is not None:
        reasons["backend"] = f"auto: {choice.reason}"
        reasons["precision"] = f"{precision}: " + ("measured faster than bf16" if precision == "fp8"
                                                   else AUTO_PRECISION_REASON[device])
        if engine:
            reasons["engine"] = "auto" + _engine_note(backend, engine)
    budget = None
    predicted_peak = None
    if device == "cuda":
        if not facts.gpus:
            raise BackendError("--device cuda: no CUDA GPU is visible on this machine")
        budget, reasons["memory"] = gpu_budget(facts, options, thresholds)
    if probe is not None:
        largest = probe.micro_batch
        if largest < 1:
            what = f"--micro-batch {options.micro_batch}" if options.micro_batch else "a micro-batch of 1"
            raise BackendError(f"{what} does not fit the memory budget of {budget:.1f} GiB "
                               f"({reasons.get('memory', '')}); use --max-vram/--target-util or a smaller model")
        predicted_peak = probe.peak_gib
        how = (f"verified --micro-batch {options.micro_batch} with one real step" if options.micro_batch
               else f"{len(probe.tried)} real steps in {probe.seconds:.0f} s; fit "
                    f"{probe.fixed_gib:.2f} GiB + {probe.per_sample_gib:.3f} GiB/study predicted "
                    f"{probe.predicted}, confirmed {largest}" if probe.per_sample_gib is not None
               else f"{len(probe.tried)} real steps in {probe.seconds:.0f} s, confirmed {largest}")
        reasons["probe"] = how
    elif device == "cuda":
        largest = options.micro_batch or -(-effective // world_size)
        reasons["probe"] = "--no-probe: micro-batch not measured" + (
            "" if options.micro_batch else f" (one process's share of the effective batch {effective})")
    else:
        largest = options.micro_batch or -(-effective // world_size)
        reasons["probe"] = "no GPU: nothing to measure"
    batch = plan_batch(largest, world_size, options.batch_policy, effective, options.lr_scaling, cfg.lr_ve, cfg.lr_ed,
                       train_studies, thresholds.min_steps_per_epoch, thresholds.max_warmup_steps)
    if options.micro_batch:
        batch = replace(batch, reasons={**batch.reasons, "micro_batch": f"{batch.micro_batch}: {USER_MICRO_BATCH}"})
    elif probe is None:
        batch = replace(batch, reasons={**batch.reasons, "micro_batch": f"{batch.micro_batch}: one process's share "
                                        f"of the effective batch {effective} ({reasons['probe']})"})
    if predicted_peak is not None and probe and probe.fixed_gib is not None and probe.per_sample_gib is not None \
            and batch.micro_batch != probe.micro_batch:
        predicted_peak = probe.fixed_gib + probe.per_sample_gib * batch.micro_batch

    autotune = None
    if device == "cuda":
        autotune, reasons["autotune"] = plan_autotune(batch.micro_batch, cfg.cudnn_benchmark,
                                                      thresholds.autotune_below_micro_batch)

    from r2gen.model.r2gen import DATASETS

    decoded = decoded_size_gib(studies, DATASETS[cfg.model.dataset], cfg.image_size)
    loader = plan_loader(facts.host, thresholds, decoded, processes_per_host=world_size, uses_gpu=device == "cuda")
    if options.num_workers is not None:
        workers = options.num_workers
        loader = replace(loader, num_workers=workers, persistent_workers=workers > 0,
                         prefetch_factor=loader.prefetch_factor or thresholds.prefetch_factor if workers else None,
                         reasons={**loader.reasons, "num_workers": f"{workers}: --num-workers",
                                  "persistent_workers": "on: workers survive between epochs" if workers
                                  else "off: no workers"})
    engine = dict(engine or {})
    if engine:
        reasons.setdefault("engine", "as asked" + _engine_note(backend, engine))
    return Plan(backend.name, device, precision, batch, loader, budget, predicted_peak, reasons,
                max_vram_gib=options.max_vram_gib, probe=probe, engine=engine,
                disk=replace(disk, keep_last=cfg.keep_last) if disk else None, cudnn_autotune=autotune)


AUTOTUNE_MEASURED = ("H100, bf16, tuned vs untuned: a step 84.5 vs 84.6 ms at 65, 44.2 vs 47.1 ms at 20; "
                     "a new shape's first step 12.7 vs 2.7 s at 65")
"""What the autotuning rule rests on (docs/measurements.md, 2026-12-07)."""


def autotunes(micro_batch: int, below: int) -> bool:
    """Whether a step at `micro_batch` studies runs with cuDNN autotuning (thresholds' autotune_below_micro_batch):
    the one rule of the plan (training) and the memory probe (its candidate steps, which must see the
    workspaces training will)."""
    return micro_batch < below


def plan_autotune(micro_batch: int, asked: bool, below: int) -> tuple[bool, str]:
    """cuDNN autotuning (timing every convolution algorithm once per input shape) and why: it pays at small
    micro-batches, where cuDNN's own choice is slower per step; at `below` studies or more its choice steps
    as fast, and tuning costs seconds for each new shape (the first window, a shorter last one, evaluation)."""
    if not asked:
        return False, "off: --no-speedups"
    if autotunes(micro_batch, below):
        return True, (f"on: micro-batch {micro_batch} < {below} (thresholds' autotune_below_micro_batch), where "
                      f"a tuned step is faster ({AUTOTUNE_MEASURED})")
    return False, (f"off: at micro-batch {micro_batch} >= {below} cuDNN's own algorithms step as fast and tuning "
                   f"costs seconds per new shape ({AUTOTUNE_MEASURED})")


def apply_plan(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """The loop's configuration with the plan's batch, learning rates, loader settings and cuDNN autotuning."""
    b, lo = plan.batch, plan.loader
    autotune = cfg.cudnn_benchmark and (plan.cudnn_autotune is not False)  # None: a plan from before it was planned
    return cfg.replace(cudnn_benchmark=autotune, window_size=b.micro_batch * b.accumulation, micro_batch=b.micro_batch, lr_ve=b.lr_ve,
                       lr_ed=b.lr_ed, warmup_steps=b.warmup_steps, num_workers=lo.num_workers, pin_memory=lo.pin_memory,
                       prefetch_factor=lo.prefetch_factor or cfg.prefetch_factor, cache_images=lo.cache_images,
                       max_vram_gib=plan.max_vram_gib or 0.0)


def _engine_note(backend: EngineSpec, engine: dict) -> str:
    """": " and what the engine's spec says about its options (the plan's "engine" reason), else ""."""
    note = backend.note(engine)
    return f": {note}" if note else ""
