"""The one shared R2Gen training loop: epochs, steps, evaluation, early stopping, checkpoints, metrics.

Read it top to bottom: `prepare` validates everything and builds the pieces (nothing is written);
`train` creates the run directory and runs the epochs through a backend adapter, which owns
devices, precision and the optimizer step. Faithful to R2Gen's trainer: Adam (amsgrad) with two
parameter groups, StepLR per epoch, masked NLL on teacher-forced reports, clip_grad_value 0.1,
beam-search evaluation on val and test, val BLEU_4 monitored for the best checkpoint and early stop.

Run directory: config.json, tokenizer.json, metrics.jsonl, reports/{val,test}_epochNNN.json,
checkpoints/ (resumable step-N states, best.pt, manifest.json: r2gen.checkpoint.CheckpointStore).
`train(..., resume=checkpoint)` continues a run exactly where a state was saved (LoopState, the
random states, the resumable data order of r2gen.data.sampling).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from backends.base import Backend
from r2gen.checkpoint import (CheckpointStore, UnreadableCheckpoint, load_checkpoint, model_checkpoint_bytes,
                              save_checkpoint, tensor_bytes, write_json, write_text)
from r2gen.config import TrainConfig
from r2gen.data.datasets import Annotation, ReportDataset, build_transform, collate, images_to_device
from r2gen.data.sampling import EpochBatchSampler, EpochSampler, chunk_sizes
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import ConfigError, RunFailed
from r2gen.wandb_log import WandbSink, wandb_config
from r2gen.findings import findings_scores, labelled
from r2gen.metrics import compute_scores
from r2gen.monitor import data_wait_warning, system_metrics
from r2gen.model.r2gen import R2GenModel, masked_nll, target_tokens
from r2gen.model.sampling import beam_search, generate_from_features, greedy
from r2gen.speedups import cudnn_autotuning
from r2gen.model.visual_extractor import init_visual_weights, smallest_micro_batch

MONITOR = "BLEU_4"
T = TypeVar("T")


@dataclass
class Prepared:
    """Everything validated and built, before anything is written."""

    cfg: TrainConfig
    backend: Backend
    annotation: Annotation
    tokenizer: Tokenizer
    model: R2GenModel
    weights_source: str


@dataclass
class RunResult:
    run_dir: Path
    epochs_run: int
    steps: int
    best_epoch: int
    val: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    best_test: dict[str, float | None] = field(default_factory=dict)  # the best val epoch's model on test
    baseline_val: dict[str, float | None] = field(default_factory=dict)
    baseline_test: dict[str, float | None] = field(default_factory=dict)
    samples_per_s: float = 0.0
    peak_memory_gib: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: TrainConfig, backend: Backend, annotation: Annotation, visual_weights: Path | None) -> Prepared:
    """Build tokenizer and model and load weights; raises UsageError subclasses on bad input."""
    seed_everything(cfg.seed)
    tokenizer = Tokenizer.from_reports(annotation.dataset, (s.report for s in annotation.splits["train"]),
                                       cfg.threshold)
    model = R2GenModel(cfg.model, len(tokenizer))
    weights_source = init_visual_weights(model.visual_extractor, visual_weights)
    return Prepared(cfg, backend, annotation, tokenizer, model, weights_source)


def build_optimizer(model: R2GenModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    ve_params = list(model.visual_extractor.parameters())
    ve_ids = {id(p) for p in ve_params}
    ed_params = [p for p in model.parameters() if id(p) not in ve_ids]
    # The fused update (one kernel, the same arithmetic) where every parameter is on one kind of device
    # that has it: a GPU, or the CPU (there 4.7x faster than the per-tensor loop for the tiny preset).
    # Every adapter calls this after moving the model to where it trains.
    fused = cfg.fused_optimizer and {p.device.type for p in model.parameters()} in ({"cuda"}, {"cpu"}) or None
    return torch.optim.Adam([{"params": ve_params, "lr": cfg.lr_ve}, {"params": ed_params, "lr": cfg.lr_ed}],
                            weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, fused=fused)


def optimizer_factory(cfg: TrainConfig) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """build_optimizer for this configuration, called by the backend adapter's prepare()."""
    return lambda model: build_optimizer(model, cfg)


def prepare_model(backend: Backend, model: R2GenModel, cfg: TrainConfig):
    """The backend's prepare (device, wrapping, optimizer) and then the GPU speed-ups this backend allows
    (r2gen.speedups): (model as the backend wraps it, optimizer)."""
    from r2gen.speedups import speed_up

    model, optimizer = backend.prepare(model, optimizer_factory(cfg))
    speed_up(backend.unwrap(model), backend, cfg)
    return model, optimizer


def _worker_leaves_stop_signals_to_the_loop(_: int) -> None:
    """A loader worker ignores SIGTERM and Ctrl-C: `timeout`, a scheduler's job kill (SLURM signals
    every process of the job) and Ctrl-C reach the whole process group, and a worker that died of it
    crashed the loop ("DataLoader worker ... is killed by signal: Terminated", seen on the GPU host)
    before it could finish the step and save. The loop acts on the signal and ends its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(prep: Prepared, split: str, train: bool) -> DataLoader:
    cfg = prep.cfg
    dataset = ReportDataset(prep.annotation.splits[split], prep.tokenizer, cfg.model.max_seq_length,
                            build_transform(cfg.image_size, train), cache=cfg.cache_images, progress=True,
                            uint8=cfg.uint8_images)
    workers = cfg.num_workers
    # Training: this process's share of one shuffle per epoch in windows, epoch after epoch from one
    # iteration (the workers prepare the next epoch while this one ends), resumable at any window.
    batching = (dict(batch_sampler=EpochBatchSampler(
        EpochSampler(len(dataset), cfg.seed, prep.backend.rank, prep.backend.world_size), cfg.batch_size,
        cfg.max_steps_per_epoch, cfg.epochs, smallest_micro_batch(cfg.image_size))) if train
        else dict(batch_size=cfg.eval_batch(len(dataset))))
    # A private generator: starting an iteration must not draw from the global RNG, or a resumed
    # run's dropout would drift from the uninterrupted one's.
    return DataLoader(dataset, **batching, num_workers=workers,
                      collate_fn=collate, pin_memory=cfg.pin_memory and prep.backend.device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=cfg.prefetch_factor if workers else None,
                      worker_init_fn=_worker_leaves_stop_signals_to_the_loop if workers else None,
                      generator=torch.Generator().manual_seed(cfg.seed))


class MetricsLog:
    """Append-only metrics.jsonl; one JSON object per line with stable keys; the same records to
    Weights & Biases when a sink is given (--wandb)."""

    def __init__(self, path: Path | None, sink: WandbSink | None = None):
        self.path = path  # None: a process other than rank 0, which writes nothing
        self.sink = sink

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        record = {**record, "time/unix_s": round(time.time(), 3)}  # wall clock: time to a score, across resumes
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.sink is not None:
            self.sink.log(record)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def evaluate(model: R2GenModel, loader: DataLoader, backend: Backend, tokenizer: Tokenizer,
             cfg: TrainConfig) -> tuple[dict[str, float | None], list[dict], float]:
    """Generate a report for every study; returns metrics (with `loss`, the teacher-forced per-token
    NLL of the true reports, as in training but without dropout), per-study records and samples/s."""
    model.eval()
    records: list[dict] = []
    start = time.perf_counter()
    guard = OomRecovery(loader.batch_size or 1, retries=cfg.oom_retries)
    nll, tokens = 0.0, 0.0

    def generate_in_chunks(batch: dict, micro: int) -> tuple[list[list[int]], float]:
        out: list[list[int]] = []
        summed = 0.0
        for chunk in split_batch(batch, micro):
            images = images_to_device(chunk["images"], backend.device)
            targets = chunk["targets"].to(backend.device, non_blocking=True)
            with backend.autocast():
                att_feats, _ = model.extract(images)  # once, for the loss and the reports
                logprobs = model.forward_features(att_feats, targets)
                if cfg.reference_generation:  # the published decoding, from the images (bench/time_to_quality.py)
                    seqs = (beam_search(model, images, cfg.beam_size) if cfg.beam_size > 1
                            else greedy(model, images, cfg.block_trigrams))
                else:
                    seqs = generate_from_features(model, att_feats, beam_size=cfg.beam_size,
                                                  block_trigrams=cfg.block_trigrams)
                out += seqs.cpu().tolist()
            summed += masked_nll(logprobs.float(), targets, chunk["masks"].to(backend.device), 1.0).item()
        return out, summed

    for batch in loader:
        with torch.no_grad(), cudnn_autotuning(False):  # generation's shapes are not worth autotuning
            seqs, summed = guard.run(lambda micro: generate_in_chunks(batch, micro), lambda: release_memory(backend))
        nll += summed
        tokens += float(target_tokens(batch["masks"]))
        generated = tokenizer.decode_batch(seqs)
        truths = tokenizer.decode_batch(batch["targets"][:, 1:].tolist())
        records += [{"id": i, "ground_truth": g, "generated": r} for i, g, r in zip(batch["ids"], truths, generated)]
    speed = len(records) / max(time.perf_counter() - start, 1e-9)
    model.train()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()  # generation's blocks have other shapes than training's: give them back
    scores = compute_scores([r["ground_truth"] for r in records], [r["generated"] for r in records])
    scores["loss"] = nll / max(tokens, 1.0)
    return {**scores, **split_findings_scores(loader.dataset.studies, records)}, records, speed


def split_findings_scores(studies, records: list[dict]) -> dict[str, float | None]:
    """Findings accuracy and F1 of the records' generated reports (r2gen.findings), where every study of
    the split has the embedded set's labels; {} on other data (the keys are absent, not zero)."""
    truth = {s.id: s.findings for s in studies}
    truths = labelled([truth.get(r["id"]) for r in records])
    return findings_scores(truths, [r["generated"] for r in records]) if truths else {}


def constant_report_baseline(prep: Prepared, split: str = "test") -> dict[str, float | None]:
    """Scores on `split` of always answering the most frequent train report (the bar to clear)."""
    max_len = prep.cfg.model.max_seq_length
    as_truth = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:])
                for s in prep.annotation.splits["train"]]
    counts = Counter(as_truth)
    constant = min(counts, key=lambda r: (-counts[r], r))
    studies = prep.annotation.splits[split]
    truths = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:]) for s in studies]
    records = [{"id": s.id, "generated": constant} for s in studies]
    return {**compute_scores(truths, [constant] * len(truths)), **split_findings_scores(studies, records)}


def micro_batch_sizes(total: int, micro_batch: int, smallest: int = 1) -> list[int]:
    """`total` studies in micro-batches of `micro_batch`, the last one shorter. A last one under
    `smallest` (see smallest_micro_batch) takes studies from the one before (9 in 4s, smallest 2:
    4, 3, 2) or, with none to spare there, joins it (3 in 2s: 3). A micro_batch under `smallest` (an
    out-of-memory recovery halving it to 1) counts as `smallest`."""
    micro_batch = max(micro_batch, smallest)
    sizes = chunk_sizes(total, micro_batch)
    if len(sizes) > 1 and sizes[-1] < smallest:
        short = smallest - sizes[-1]
        sizes[-2:] = [sizes[-2] - short, smallest] if sizes[-2] - short >= smallest else [sizes[-2] + sizes[-1]]
    return sizes


def split_batch(batch: dict, micro_batch: int, smallest: int = 1) -> list[dict]:
    """Chunks of at most `micro_batch` studies, none under `smallest` where avoidable (see
    micro_batch_sizes), each trimmed to its own longest report.

    Trimming drops only trailing padding, which the causal decoder and the mask ignore, so a chunk
    computes what the same rows compute inside the whole batch.
    """
    chunks, start = [], 0
    for size in micro_batch_sizes(len(batch["ids"]), micro_batch, smallest):
        rows = slice(start, start + size)
        start += size
        masks = batch["masks"][rows]
        width = int(masks.sum(1).max().item())
        chunks.append({"ids": batch["ids"][rows], "images": batch["images"][rows],
                       "targets": batch["targets"][rows, :width], "masks": masks[:, :width]})
    return chunks


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: Backend, batch: dict,
               clip_value: float, micro_batch: int | None = None) -> tuple[float, bool]:
    """One teacher-forced optimizer step on a collated batch, in micro-batches of `micro_batch`.

    The batch is one accumulation window: each micro-batch's loss is divided by the window's token
    count, so gradients equal one step on the whole batch (R2Gen's per-token mean), also for the
    uneven last window of an epoch. Returns (per-token loss, whether the optimizer stepped).

    A window whose loss is not finite on any process is not stepped: its gradients are dropped
    and NonFiniteLoss raised (every process agrees, before the last backward all-reduces).
    """
    # In training mode BatchNorm needs more than one study behind a 1x1 feature map (32 px or less).
    smallest = smallest_micro_batch(batch["images"].shape[-1]) if model.training else 1
    micro = micro_batch or len(batch["ids"])
    chunks = split_batch(batch, micro, smallest)
    # DDP averages gradients over processes: divide by the mean token count per process, so the
    # update is the per-token mean over every process's window.
    tokens = backend.all_reduce_sum(target_tokens(batch["masks"]).to(backend.device)) / backend.world_size
    total = torch.zeros((), device=backend.device)
    stepped = True
    for i, chunk in enumerate(chunks):
        images = images_to_device(chunk["images"], backend.device)
        targets = chunk["targets"].to(backend.device, non_blocking=True)
        masks = chunk["masks"].to(backend.device, non_blocking=True)
        with backend.autocast(), cudnn_autotuning(len(chunk["ids"]) == micro):  # a shorter chunk: heuristics
            logprobs = model(images, targets)
        loss = masked_nll(logprobs.float(), targets, masks, tokens)
        total += loss.detach()
        last = i == len(chunks) - 1
        if last and backend.all_reduce_sum((~torch.isfinite(total)).float()).item() > 0:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"the loss is {total.item()} (not finite) on at least one process")
        stepped = backend.backward_and_step(loss, model, optimizer, clip_value, step=last)
    return total.item(), stepped


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of optimizer step `step` (0-based) in a linear warm-up over
    `warmup_steps`: 1/warmup_steps, 2/warmup_steps, ..., then 1."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


@contextlib.contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, factor: float):
    """The optimizer's rates times `factor` for one step, then the scheduler's own again (StepLR reads and
    sets them per epoch, so they must be its values between steps)."""
    if factor == 1.0:
        yield
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


class NonFiniteLoss(RuntimeError):
    """A window's loss was inf or NaN; its optimizer step was not taken."""


class OutOfMemoryAtOne(RuntimeError):
    """Even a micro-batch of one study does not fit, after every retry (or the engine cannot redo a step)."""


@dataclass
class OomRecovery:
    """Runs work in micro-batches (optimizer steps, generation); on out-of-memory, frees everything,
    halves the micro-batch (for a step: doubling the accumulation, so the effective batch stays) and
    redoes the same samples.

    At a micro-batch of 1 it waits and retries `retries` times (another process may free memory),
    then raises OutOfMemoryAtOne for the loop to save and stop.
    """

    micro_batch: int
    retries: int = 3
    wait_s: float = 5.0
    recoveries: int = 0
    events: list[dict] = field(default_factory=list)

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, backend: Backend, batch: dict,
             clip_value: float) -> tuple[float, bool]:
        if not backend.can_redo_step:
            try:
                return train_step(model, optimizer, backend, batch, clip_value, self.micro_batch)
            except torch.OutOfMemoryError as err:
                raise OutOfMemoryAtOne(f"out of memory at micro-batch {self.micro_batch} under {backend.name}, which "
                                       "keeps a failed step's partial gradients inside its engine, so the step cannot "
                                       f"be redone smaller ({str(err).splitlines()[0] if str(err) else 'no message'})"
                                       ) from None
        return self.run(lambda micro: train_step(model, optimizer, backend, batch, clip_value, micro),
                        lambda: release_memory(backend, optimizer, model))

    def run(self, work: Callable[[int], T], release: Callable[[], None]) -> T:
        """work(micro_batch), retried with half the micro-batch after each out-of-memory error."""
        failures_at_one = 0
        while True:
            try:
                return work(self.micro_batch)
            except torch.OutOfMemoryError as err:
                message = str(err).splitlines()[0] if str(err) else "out of memory"
            # Outside the except block: the traceback no longer pins the step's tensors.
            release()
            if self.micro_batch == 1:
                failures_at_one += 1
                if failures_at_one > self.retries:
                    raise OutOfMemoryAtOne(f"out of memory at micro-batch 1 after {self.retries} retries: {message}")
                time.sleep(self.wait_s)
                continue
            before, self.micro_batch = self.micro_batch, self.micro_batch // 2
            self.recoveries += 1
            self.events.append({"oom/micro_batch_from": before, "oom/micro_batch_to": self.micro_batch,
                                "oom/message": message})


CUDA_CONTEXT_GIB = 0.5
"""GPU memory a process holds outside torch's allocator (CUDA context, library handles), about."""


def cap_gpu_memory(device: torch.device, max_vram_gib: float) -> None:
    """--max-vram: the allocator raises out-of-memory beyond the cap minus the context's share, as a
    card of that size would (0 = no cap)."""
    if not max_vram_gib:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max((max_vram_gib - CUDA_CONTEXT_GIB) * 2**30 / total, 0.01), 1.0),
                                               index)


def release_memory(backend: Backend, optimizer: torch.optim.Optimizer | None = None,
                   model: torch.nn.Module | None = None) -> None:
    """Drop partial gradients, the model's captured CUDA graphs and cached blocks after an out-of-memory error."""
    import gc

    from r2gen.speedups import release_graphs

    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if model is not None:
        release_graphs(backend.unwrap(model))
    gc.collect()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(console: Console) -> Progress:
    # Not a terminal (nohup, a batch scheduler's log): no bar, which would print only at the end;
    # the loop prints one epoch_line per epoch instead.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(epoch: int, epochs: int, steps: int, loss: float, samples_per_s: float, data_wait_pct: float,
               epoch_s: float, scores: dict[str, float | None] | None = None) -> str:
    """The plain line printed after each epoch when the output is not a terminal; ETA from this
    epoch's wall time (evaluation and checkpoints included) times the epochs left."""
    line = (f"epoch {epoch}/{epochs} | step {steps} | loss {loss:.4f} | {samples_per_s:.1f} samples/s | "
            f"data wait {data_wait_pct:.0f}% | {epoch_s:.1f} s")
    if scores:
        names = {"findings_macro_f1": "findings F1"}
        line += " | val " + " ".join(f"{names.get(k, k)} {v:.4f}" for k, v in scores.items() if v is not None)
    return line + f" | ETA {_clock(epoch_s * (epochs - epoch))}"


@dataclass
class LoopState:
    """Where the loop stands, besides model, optimizer, scheduler and engine: what a resumed run
    needs to continue exactly (saved in every resumable checkpoint)."""

    epoch: int = 1                  # the epoch in progress
    position: int = 0               # its loader batches (accumulation windows) already done
    steps: int = 0                  # optimizer steps so far, all epochs
    best_score: float = -float("inf")
    best_epoch: int = 0
    epoch_loss: float = 0.0         # the epoch in progress: sum of step losses, skipped steps, samples
    skipped: int = 0
    nonfinite: int = 0              # windows with a non-finite loss this epoch; and in a row, all epochs
    nonfinite_run: int = 0
    epoch_samples: int = 0
    train_samples: int = 0
    train_time_s: float = 0.0
    metrics_bytes: int = 0          # metrics.jsonl's length at the save: a resume drops what came after

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0
        self.epoch_loss, self.skipped, self.nonfinite, self.epoch_samples = 0.0, 0, 0, 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """SIGTERM or Ctrl-C during training: noted, acted on after the current optimizer step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame: object) -> None:
        if self.signal is not None and signum == 2:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(RunFailed):
    """Stopped by a signal after saving; --keep-training continues."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def train(prep: Prepared, run_dir: Path, console: Console | None = None, plan_json: str | None = None,
          resume: Path | None = None) -> RunResult:
    """Run the epochs; writes the run directory (with the launcher's plan.json); returns the final scores.

    `resume`: a resumable checkpoint of this run to continue from, exactly where it was saved.
    """
    cfg, backend, tokenizer = prep.cfg, prep.backend, prep.tokenizer
    main = backend.is_main  # only rank 0 writes, evaluates and shows progress
    console = (console or Console(stderr=True)) if main else Console(quiet=True)
    seed_everything(cfg.seed)
    model, optimizer = prepare_model(backend, prep.model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    # Only rank 0 evaluates: the other processes neither build nor cache the val and test sets.
    loaders = {split: _loader(prep, split, train=split == "train")
               for split in (("train", "val", "test") if main else ("train",))}
    store = CheckpointStore(run_dir / "checkpoints", cfg.keep_last)
    metrics_path = run_dir / "metrics.jsonl"
    loop = LoopState()
    if resume is not None:
        try:  # weights-only: a file that is not our own state is refused before any of its code runs
            state = load_checkpoint(resume / "loop.pt" if resume.is_dir() else resume)
        except UnreadableCheckpoint as exc:
            raise ConfigError(f"--keep-training: {exc}") from None
        if resume.is_dir():  # an engine checkpoint (DeepSpeed, Accelerate): weights and optimizer from it
            backend.load_engine(model, resume)
        else:
            backend.unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        backend.load_state_dict(state["backend"])
        loop = LoopState(**state["loop"])
        if len(state["rng"]) != backend.world_size:
            raise ConfigError(f"--keep-training: {resume} was saved by {len(state['rng'])} process(es), "
                              f"this run has {backend.world_size}")
        set_rng_state(state["rng"][backend.rank])
        if main and metrics_path.is_file():
            with metrics_path.open("r+b") as f:  # records after the save happen again
                f.truncate(loop.metrics_bytes)
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "reports").mkdir(exist_ok=True)
        write_json(run_dir / "config.json", {"train": cfg.to_dict(), "backend": backend.describe(),
                                             "annotation": str(prep.annotation.path),
                                             "image_dir": str(prep.annotation.image_dir),
                                             "visual_weights": prep.weights_source})
        write_text(run_dir / "tokenizer.json", tokenizer.to_json())
        if plan_json is not None:
            write_text(run_dir / "plan.json", plan_json)
    sink = None
    if main and cfg.wandb:
        sink = WandbSink(run_dir, cfg.wandb_mode, cfg.wandb_project, cfg.wandb_name,
                         wandb_config(cfg.to_dict(), plan_json))
    log = MetricsLog(metrics_path if main else None, sink)

    def save_state() -> Path | None:
        """A resumable checkpoint of this moment. Rank 0 writes it; an engine with its own checkpoint
        (DeepSpeed) has every process write its part first."""
        if backend.saves_engine:
            staged = store.staging(loop.steps)
            needed = store.needed_bytes(model_checkpoint_bytes(backend.unwrap(model), cfg.amsgrad, engine_saves=True))
            if main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            backend.barrier()
            with store.writing(staged, needed, discard=staged):  # a full disk: one line, the staged part removed
                backend.save_engine(model, staged)
            backend.barrier()
        rngs = backend.gather(rng_state())  # each process's own: they drew differently (dropout on its rows)
        if not main:
            return None
        loop.metrics_bytes = metrics_path.stat().st_size if metrics_path.is_file() else 0
        state = _state(backend, model, optimizer, scheduler, cfg, tokenizer, loop, plan_json, rngs)
        if backend.saves_engine:
            with store.writing(staged / "loop.pt", tensor_bytes(state), discard=staged):
                save_checkpoint(state, staged / "loop.pt")
            path = store.commit(staged, loop.steps, loop.epoch)
        else:
            path = store.save(state, loop.steps, loop.epoch)
        return path

    def evaluate_split(split: str, epoch: int, name: str | None = None) -> dict:
        """Reports and scores of `split` with the model as it is; the records under `name/` (default: split)."""
        scores, reports, speed = evaluate(backend.unwrap(model), loaders[split], backend, tokenizer, cfg)
        name = name or split
        write_json(run_dir / "reports" / f"{name}_epoch{epoch:03d}.json", reports)
        return {**{f"{name}/{k}": v for k, v in scores.items()}, f"perf/{split}_generate_samples_per_s": speed}

    if backend.device.type == "cuda":
        cap_gpu_memory(backend.device, cfg.max_vram_gib)
        torch.cuda.reset_peak_memory_stats(backend.device)

    windows: EpochBatchSampler = loaders["train"].batch_sampler
    steps_per_epoch = windows.steps_per_epoch
    # One iteration for all epochs, from the first window not yet done (the same on every process).
    windows.set_epoch(loop.epoch, start=min(loop.position * cfg.batch_size, windows.per_process))
    train_batches = iter(loaders["train"])
    result = RunResult(run_dir=run_dir, epochs_run=loop.epoch - 1, steps=loop.steps, best_epoch=loop.best_epoch)
    oom = OomRecovery(cfg.micro_batch or cfg.batch_size, retries=cfg.oom_retries)
    last_save = time.perf_counter()
    model.train()
    with _progress(console) as progress, StopRequest() as stop:
        task = progress.add_task("train", total=cfg.epochs * steps_per_epoch, completed=loop.steps, info="")
        while loop.epoch <= cfg.epochs:
            epoch = loop.epoch
            epoch_start = epoch_began = time.perf_counter()
            epoch_wait = 0.0
            window_samples, window_tokens, window_wait = 0, 0, 0.0
            window_start = ready = time.perf_counter()
            warned_wait = False
            while loop.position < steps_per_epoch:
                batch = next(train_batches)
                waited = time.perf_counter() - ready  # the step waited this long for the loader
                window_wait += waited
                epoch_wait += waited
                try:
                    with warmed_up(optimizer, warmup_factor(loop.steps, cfg.warmup_steps)):
                        loss_value, stepped = oom.step(model, optimizer, backend, batch, cfg.clip_value)
                    loop.nonfinite_run = 0
                except NonFiniteLoss as exc:
                    # The window is consumed without a step; the weights are those after the last good step.
                    loop.nonfinite += 1
                    loop.nonfinite_run += 1
                    loop.steps += 1
                    loop.position += 1
                    log.write({"step": loop.steps, "epoch": epoch, "train/nonfinite_loss": True})
                    console.print(f"[yellow]skipped step {loop.steps}:[/] {exc}", highlight=False)
                    if loop.nonfinite_run >= cfg.max_nonfinite or not backend.can_redo_step:
                        path = save_state()
                        why = (f"{loop.nonfinite_run} windows in a row" if backend.can_redo_step else
                               f"{backend.name} keeps the window's partial gradients")
                        raise RunFailed(f"the loss was not finite ({why}); saved the state after the last good "
                                        f"step to {path}. Lower the learning rates or use bf16/fp32, then continue "
                                        "with --keep-training") from None
                    ready = time.perf_counter()
                    continue
                except OutOfMemoryAtOne as exc:
                    # The failed window never stepped: the state is that after the last good step.
                    log.write({"step": loop.steps, "epoch": epoch, "oom/gave_up": True})
                    path = save_state()
                    raise RunFailed(f"{exc}; saved the last good state to {path}. Free GPU memory (or set "
                                    "--max-vram lower) and continue with --keep-training") from None
                for event in oom.events:
                    log.write({"step": loop.steps, "epoch": epoch, **event})
                    console.print(f"[yellow]out of memory:[/] micro-batch {event['oom/micro_batch_from']} -> "
                                  f"{event['oom/micro_batch_to']}, same samples redone", highlight=False)
                oom.events.clear()
                loop.skipped += not stepped
                loop.epoch_loss += loss_value
                loop.steps += 1
                loop.position += 1
                window_samples += len(batch["ids"])
                window_tokens += int(target_tokens(batch["masks"]).item())
                loop.train_samples += len(batch["ids"])
                loop.epoch_samples += len(batch["ids"])
                if loop.steps % cfg.log_every == 0:
                    now = time.perf_counter()
                    elapsed = max(now - window_start, 1e-9)
                    wait_pct = 100 * window_wait / elapsed
                    factor = warmup_factor(loop.steps - 1, cfg.warmup_steps)  # the rate this step used
                    log.write({"step": loop.steps, "epoch": epoch, "train/loss": loss_value,
                               "lr/visual_extractor": optimizer.param_groups[0]["lr"] * factor,
                               "lr/encoder_decoder": optimizer.param_groups[1]["lr"] * factor,
                               "perf/samples_per_s": window_samples / elapsed,
                               "perf/tokens_per_s": window_tokens / elapsed, "perf/data_wait_pct": wait_pct,
                               **system_metrics(backend.device)})
                    warning = data_wait_warning(wait_pct, cfg.num_workers)
                    if warning and not warned_wait:  # once per epoch
                        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
                        warned_wait = True
                    progress.update(task, info=f"epoch {epoch}/{cfg.epochs} loss {loss_value:.3f} "
                                               f"{window_samples / elapsed:.1f} samples/s, data wait {wait_pct:.0f}%")
                    window_samples, window_tokens, window_wait, window_start = 0, 0, 0.0, now
                progress.update(task, advance=1)
                # Every process stops after the same step when any of them was asked to.
                stopping = bool(backend.all_reduce_sum(torch.tensor(float(stop.signal is not None))).item())
                ready = time.perf_counter()
                if stopping or (cfg.save_every and loop.steps % cfg.save_every == 0):
                    loop.train_time_s += time.perf_counter() - epoch_start
                    epoch_start = time.perf_counter()
                    path = save_state()
                    backend.barrier()
                    ready = time.perf_counter()  # saving is not waiting for data
                    if stopping:
                        name = {2: "Ctrl-C", 15: "SIGTERM"}.get(stop.signal or 0, "a signal")
                        raise Stopped(f"stopped by {name} after step {loop.steps}; saved {path}. Continue with "
                                      "the same command and --keep-training", stop.signal or 15)
            loop.train_time_s += time.perf_counter() - epoch_start
            train_s = max(time.perf_counter() - epoch_began, 1e-9)
            epoch_samples = int(backend.all_reduce_sum(torch.tensor(float(loop.epoch_samples))).item())
            epoch_loss = loop.epoch_loss / max(steps_per_epoch, 1)
            scheduler.step()
            result.epochs_run = epoch
            log.write({"step": loop.steps, "epoch": epoch,
                       "train/loss_epoch": epoch_loss,
                       "train/skipped_steps": loop.skipped, "train/nonfinite_steps": loop.nonfinite,
                       "train/samples": epoch_samples,
                       "train/micro_batch": oom.micro_batch, "oom/recoveries": oom.recoveries})

            last = epoch == cfg.epochs
            stop_early = False
            val_scores = None  # this epoch's, for the plain epoch line
            improved = False
            if main and ((cfg.val_every and epoch % cfg.val_every == 0) or last):
                progress.update(task, info=f"epoch {epoch}/{cfg.epochs} evaluating val")
                record: dict = {"step": loop.steps, "epoch": epoch, **evaluate_split("val", epoch)}
                val_scores = {k: record.get(f"val/{k}") for k in ("BLEU_4", "CIDEr", "findings_macro_f1")}
                score = record[f"val/{MONITOR}"]
                improved = score is not None and score > loop.best_score
                if improved:
                    loop.best_score, loop.best_epoch = score, epoch
                if epoch - loop.best_epoch > cfg.early_stop:
                    console.print(f"early stop: val {MONITOR} did not improve for {epoch - loop.best_epoch} epochs")
                    stop_early = True
                # Test: the last model (and, after the loop, the best one), or every test_every epochs.
                if last or stop_early or (cfg.test_every and epoch % cfg.test_every == 0):
                    progress.update(task, info=f"epoch {epoch}/{cfg.epochs} evaluating test")
                    record.update(evaluate_split("test", epoch))
                result.val = {k.removeprefix("val/"): v for k, v in record.items() if k.startswith("val/")}
                if "test/BLEU_4" in record:
                    result.test = {k.removeprefix("test/"): v for k, v in record.items() if k.startswith("test/")}
                log.write(record)
            stop_now = backend.broadcast_flag(stop_early)
            # Resumable states on a wall-time cadence, and always at the end and before an early stop;
            # rank 0's clock decides for every process (an engine's checkpoint is written by all).
            due = backend.broadcast_flag(last or stop_now or not cfg.checkpoint_every_min
                                         or time.perf_counter() - last_save >= 60 * cfg.checkpoint_every_min)
            loop.next_epoch()
            if due:
                save_state()  # the start of the next epoch
                last_save = time.perf_counter()
            if main and improved:
                store.save_best(_weights(backend, model, cfg, tokenizer, loop, plan_json), epoch)
            if not console.is_terminal:
                console.print(epoch_line(epoch, cfg.epochs, loop.steps, epoch_loss, epoch_samples / train_s,
                                         100 * epoch_wait / train_s, time.perf_counter() - epoch_began, val_scores),
                              highlight=False, soft_wrap=True)
            if stop_now:
                break
            backend.barrier()
        if result.epochs_run < cfg.epochs:
            progress.update(task, total=loop.steps)

    result.steps, result.best_epoch = loop.steps, loop.best_epoch
    train_samples = int(backend.all_reduce_sum(torch.tensor(float(loop.train_samples))).item())
    result.samples_per_s = train_samples / max(loop.train_time_s, 1e-9)
    if backend.device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(backend.device) / 2**30
    if not main:
        return result
    best_pt = run_dir / "checkpoints" / "best.pt"
    if result.test and loop.best_epoch and loop.best_epoch != result.epochs_run and best_pt.is_file():
        # R2Gen reports the test scores of the model with the best val score: its weights, on test.
        console.print(f"evaluating the best model (epoch {loop.best_epoch}) on test", highlight=False)
        backend.unwrap(model).load_state_dict(load_checkpoint(best_pt)["model"])
        record = {"step": loop.steps, "epoch": result.epochs_run, "best_epoch": loop.best_epoch,
                  **evaluate_split("test", loop.best_epoch, "best_test")}
        result.best_test = {k.removeprefix("best_test/"): v for k, v in record.items() if k.startswith("best_test/")}
        log.write(record)
    elif result.test:
        result.best_test = dict(result.test)  # the last model is the best one
    result.baseline_val = constant_report_baseline(prep, "val")
    result.baseline_test = constant_report_baseline(prep, "test")
    log.write({"step": loop.steps, "epoch": result.epochs_run,
               **{f"baseline_val/{k}": v for k, v in result.baseline_val.items()},
               **{f"baseline_test/{k}": v for k, v in result.baseline_test.items()},
               "perf/train_samples_per_s": result.samples_per_s,
               **({"memory/peak_allocated_gib": result.peak_memory_gib} if result.peak_memory_gib else {})})
    log.close()
    return result


def _weights(backend: Backend, model, cfg: TrainConfig, tokenizer: Tokenizer, loop: LoopState,
             plan_json: str | None) -> dict:
    """best.pt: what `evaluate` and `generate` read (weights, configuration, vocabulary), no optimizer."""
    return {"model": backend.unwrap(model).state_dict(), "config": cfg.to_dict(), "tokenizer": tokenizer.to_json(),
            "plan": plan_json, "epoch": loop.epoch - 1, "step": loop.steps, "monitor": f"val/{MONITOR}",
            "best_score": loop.best_score}


def _state(backend: Backend, model, optimizer, scheduler, cfg: TrainConfig, tokenizer: Tokenizer,
           loop: LoopState, plan_json: str | None, rngs: list[dict]) -> dict:
    # The full weights always (best.pt and `evaluate` read any backend's checkpoint the same way);
    # the optimizer only where the engine's own checkpoint does not hold it.
    return {"model": backend.unwrap(model).state_dict(),
            "optimizer": None if backend.saves_engine else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "backend": backend.state_dict(), "config": cfg.to_dict(),
            "tokenizer": tokenizer.to_json(), "loop": asdict(loop), "rng": rngs, "plan": plan_json,
            "epoch": loop.epoch - 1 if loop.position == 0 else loop.epoch, "step": loop.steps,
            "monitor": f"val/{MONITOR}"}

