"""The memory probe: real training steps on the GPU, in the run's backend and precision, on inputs
of maximum report length, to find the largest micro-batch under the memory budget.

The only planning code that touches CUDA. `probe_in_subprocess` runs it in a fresh, spawned
process, so that every byte it allocated (and its CUDA context) is gone when training starts;
`run_probe` is the body, which also cleans up after itself when called in-process (GPU tests).
The search itself is pure (launcher.memory_model.search_micro_batch).
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backends.spec import EngineSpec
from launcher.memory_model import ProbeResult, ProbeSearch, StepResult, search_micro_batch
from launcher.thresholds import Thresholds
from r2gen.config import TrainConfig
from r2gen.model.visual_extractor import smallest_micro_batch
from r2gen.units import GIB

if TYPE_CHECKING:
    from launcher.hardware import Facts
    from launcher.plan import PlanOptions

CONTEXT_GIB_MIN, CONTEXT_GIB_MAX = 0.25, 2.0
"""Bounds on the measured GPU memory outside torch's allocator (CUDA context, cuBLAS/cuDNN handles):
the measurement subtracts the other processes' share, which may have changed since it was read."""


@dataclass(frozen=True)
class ProbeRequest:
    cfg: TrainConfig
    vocab_size: int
    precision: str
    budget_gib: float             # all the GPU memory this run may hold (target share or --max-vram, minus others)
    max_micro: int                # never try more studies than this (the train split; the faithful share)
    backend: str = "plain"        # the adapter the run trains with
    verify: int = 0               # --micro-batch: check only this micro-batch
    others_gib: float = 0.0       # memory other processes held when the plan was made
    device_index: int = 0
    engine: dict[str, Any] = field(default_factory=dict)  # the plan's engine options (zero, offload, fp8_impl)
    autotune_below: int = field(default_factory=lambda: Thresholds().autotune_below_micro_batch)  # steps tune as training's

    @classmethod
    def for_run(cls, facts: Facts, options: PlanOptions, thresholds: Thresholds, cfg: TrainConfig, vocab_size: int,
                precision: str, max_micro: int, **fields: Any) -> ProbeRequest:
        """The request for a run on this machine's first GPU (a new run's, a continued run's): its memory budget
        (launcher.plan.gpu_budget: target share or --max-vram, minus what other processes hold) and those others'
        share; `fields` the rest (backend, engine, verify)."""
        from launcher.plan import gpu_budget

        budget, _ = gpu_budget(facts, options, thresholds)
        return cls(cfg, vocab_size, precision, budget, max_micro, others_gib=facts.gpus[0].used_by_others_gib,
                   autotune_below=thresholds.autotune_below_micro_batch, **fields)

    @property
    def spec(self) -> EngineSpec:
        """The engine the probe steps (the registry's, by name: a request crosses into the probe's process)."""
        from backends.registry import spec

        return spec(self.backend)


def synthetic_batch(cfg: TrainConfig, vocab_size: int, size: int) -> dict:
    """The most expensive batch the loop can see: every report at max_seq_length tokens."""
    import torch

    from r2gen.model.r2gen import DATASETS

    g = torch.Generator().manual_seed(size)
    views = DATASETS[cfg.model.dataset]
    length = cfg.model.max_seq_length
    targets = torch.randint(1, vocab_size, (size, length), generator=g)
    targets[:, 0] = targets[:, -1] = 0  # bos and eos are id 0, as the tokenizer writes them
    return {"ids": [str(i) for i in range(size)],
            "images": torch.randn(size, views, 3, cfg.image_size, cfg.image_size, generator=g),
            "targets": targets, "masks": torch.ones(size, length)}


def _say(message: str) -> None:
    print(f"probe: {message}", file=sys.stderr, flush=True)


class ProbeSession:
    """A throwaway model and optimizer on the GPU, capped at the budget; `step(b)` is one real
    training step at micro-batch b. Use as a context manager: leaving it frees everything."""

    def __init__(self, request: ProbeRequest):
        import torch

        from backends.spec import ConfigInputs
        from r2gen.model.r2gen import R2GenModel
        from r2gen.build import prepare_model

        self.request = request
        self.device = torch.device("cuda", request.device_index)
        torch.cuda.set_device(self.device)
        engine = request.spec
        self.backend = engine.build("cuda", request.precision, request.engine)
        # The engine's config at micro-batch 1, one process (the probe steps its own batch sizes).
        engine.configure(self.backend, engine.generate_config(
            ConfigInputs("cuda", request.precision, engine.engine_options(request.engine))))
        # The training path itself, speed-ups included (CUDA graphs hold their own memory pool).
        self._build = lambda: prepare_model(self.backend, R2GenModel(request.cfg.model, request.vocab_size),
                                            request.cfg)
        self.model, self.optimizer = self._build()
        self.model.train()
        # Our memory outside the allocator (context, library handles): what the device holds beyond
        # torch's reservation and the other processes' share.
        free, self.total = torch.cuda.mem_get_info(self.device)
        held_gib = (self.total - free) / GIB - torch.cuda.memory_reserved(self.device) / GIB - request.others_gib
        self.overhead_gib = min(max(held_gib, CONTEXT_GIB_MIN), CONTEXT_GIB_MAX)
        self.allocator_gib = request.budget_gib - self.overhead_gib
        self.name = torch.cuda.get_device_name(self.device)
        if self.allocator_gib > 0:
            torch.cuda.set_per_process_memory_fraction(min(self.allocator_gib * GIB / self.total, 1.0), self.device)

    def __enter__(self) -> "ProbeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        from r2gen.speedups import release_workspaces

        del self.model, self.optimizer
        gc.collect()  # the model's captured graphs go with it
        release_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def measure(self, micro: int) -> StepResult:
        """`step` at a size training will not use (the warm-up, the fit's points): cuDNN's heuristics
        instead of its autotuning, which costs ~8 s per new shape on an H200."""
        from r2gen.speedups import cudnn_autotuning

        with cudnn_autotuning(False):
            return self.step(micro)

    def step(self, micro: int) -> StepResult:
        """One real training step at `micro`, with cuDNN autotuning where training at that micro-batch has it
        (launcher.plan.autotunes): the workspaces training will hold, and ~10 s less per step where it has not."""
        from launcher.plan import autotunes
        from r2gen.speedups import cudnn_autotuning

        with cudnn_autotuning(autotunes(micro, self.request.autotune_below)):
            return self._step(micro)

    def _step(self, micro: int) -> StepResult:
        import torch

        from r2gen.speedups import release_graphs
        from r2gen.step import release_memory, train_step

        batch = synthetic_batch(self.request.cfg, self.request.vocab_size, micro)
        release_graphs(self.backend.unwrap(self.model))  # each size is measured with its own graphs alone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            train_step(self.model, self.optimizer, self.backend, batch, self.request.cfg.clip_value, micro)
            torch.cuda.synchronize(self.device)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        del batch
        if not ok:  # outside the except block, so the traceback no longer holds the step's tensors
            release_memory(self.backend, self.optimizer, self.model)
            if not self.backend.can_redo_step:  # the engine keeps the failed step's state: start a fresh one
                del self.model, self.optimizer
                release_memory(self.backend)
                self.model, self.optimizer = self._build()
                self.model.train()
            _say(f"micro-batch {micro}: out of memory")
            return StepResult(False, None)
        peak = torch.cuda.max_memory_reserved(self.device) / GIB
        _say(f"micro-batch {micro}: peak {peak + self.overhead_gib:.2f} GiB")
        return StepResult(peak <= self.allocator_gib, peak)


    def samples_per_s(self, micro: int, steps: int = 3, warmup: int = 2) -> float | None:
        """Training speed at `micro` on a batch already on the GPU (the model step alone); None when
        it does not fit."""
        import torch

        from r2gen.step import release_memory, train_step

        batch = {k: v.to(self.device) if torch.is_tensor(v) else v
                 for k, v in synthetic_batch(self.request.cfg, self.request.vocab_size, micro).items()}
        clip = self.request.cfg.clip_value
        try:
            for _ in range(warmup):
                train_step(self.model, self.optimizer, self.backend, batch, clip, micro)
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(self.model, self.optimizer, self.backend, batch, clip, micro)
            torch.cuda.synchronize(self.device)
            speed = micro * steps / (time.perf_counter() - start)
        except torch.OutOfMemoryError:
            speed = None
        del batch
        if speed is None:
            release_memory(self.backend, self.optimizer)
        _say(f"{self.request.backend} {self.request.precision} at micro-batch {micro}: "
             + (f"{speed:.1f} samples/s" if speed else "out of memory"))
        return speed


def measure_speeds(request: ProbeRequest, engines: tuple[tuple[str, str, dict], ...], micro: int
                   ) -> dict[str, float | None]:
    """A short timed run of each (backend, precision, engine options) at the same micro-batch, keyed by
    precision: what auto compares before it picks FP8."""
    from dataclasses import replace

    speeds: dict[str, float | None] = {}
    for backend, precision, engine in engines:
        with ProbeSession(replace(request, backend=backend, precision=precision, engine=engine)) as session:
            speeds[precision] = session.samples_per_s(micro)
    return speeds


def run_probe(request: ProbeRequest) -> ProbeResult:
    """Real steps at a few micro-batch sizes (or at --micro-batch only); frees everything after."""
    start = time.perf_counter()
    with ProbeSession(request) as session:
        _say(f"{session.name}: budget {request.budget_gib:.1f} GiB ({session.allocator_gib:.1f} GiB for tensors), "
             f"{request.precision}, {request.cfg.preset} preset")
        smallest = smallest_micro_batch(request.cfg.image_size)
        if session.allocator_gib <= 0:
            search = None
        elif request.verify:
            session.measure(smallest)  # warm-up: optimizer state and kernels, as the search's first step
            result = session.step(request.verify)
            search = ProbeSearch((), None, request.verify, request.verify if result.fits else 0,
                                 ((request.verify, result),))
        else:
            search = search_micro_batch(session.step, session.allocator_gib, request.max_micro, smallest=smallest,
                                        measure=session.measure)
        return _finish(request, session.name, session.overhead_gib, search, start)


def _finish(request: ProbeRequest, name: str, overhead_gib: float, search: ProbeSearch | None,
            start: float) -> ProbeResult:
    if search is None:
        search = ProbeSearch((), None, 0, 0, ())
    peaks = {b: r.peak_gib for b, r in search.tried if r.fits}
    peak = peaks.get(search.micro_batch)
    return ProbeResult(
        gpu=name, budget_gib=request.budget_gib, overhead_gib=overhead_gib,
        points=tuple((b, p + overhead_gib) for b, p in search.points),
        fixed_gib=search.fit.fixed_gib + overhead_gib if search.fit else None,
        per_sample_gib=search.fit.per_sample_gib if search.fit else None,
        predicted=search.predicted, micro_batch=search.micro_batch,
        peak_gib=peak + overhead_gib if peak is not None else None,
        tried=tuple((b, r.fits, r.peak_gib + overhead_gib if r.peak_gib is not None else None)
                    for b, r in search.tried),
        seconds=time.perf_counter() - start)


def in_subprocess(function, *args):
    """function(*args) in a spawned process: the training process never sees the probe's allocations."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def probe_in_subprocess(request: ProbeRequest) -> ProbeResult:
    return in_subprocess(run_probe, request)

