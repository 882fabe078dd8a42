"""The one shared R2Gen training loop: epochs, steps, evaluation, early stopping, checkpoints, metrics.

Read it top to bottom: `prepare` validates everything and builds the pieces (nothing is written);
`train` creates the run directory and runs the epochs through a backend adapter, which owns
devices, precision and the optimizer step. Faithful to R2Gen's trainer: Adam (amsgrad) with two
parameter groups, StepLR per epoch, masked NLL on teacher-forced reports, clip_grad_value 0.1,
beam-search evaluation on val and test, val BLEU_4 monitored for the best checkpoint and early stop.

Run directory: config.json, tokenizer.json, metrics.jsonl, reports/{val,test}_epochNNN.json,
checkpoints/{latest,best}.pt.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from backends.base import Backend
from r2gen.checkpoint import save_checkpoint, write_json, write_text
from r2gen.config import TrainConfig
from r2gen.data.datasets import Annotation, ReportDataset, build_transform, collate
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import RunFailed
from r2gen.metrics import compute_scores
from r2gen.model.r2gen import R2GenModel, masked_nll, target_tokens
from r2gen.model.sampling import generate
from r2gen.model.visual_extractor import init_visual_weights

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
    return torch.optim.Adam([{"params": ve_params, "lr": cfg.lr_ve}, {"params": ed_params, "lr": cfg.lr_ed}],
                            weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)


def optimizer_factory(cfg: TrainConfig) -> Callable[[torch.nn.Module], torch.optim.Optimizer]:
    """build_optimizer for this configuration, called by the backend adapter's prepare()."""
    return lambda model: build_optimizer(model, cfg)


def _loader(prep: Prepared, split: str, train: bool) -> DataLoader:
    cfg = prep.cfg
    dataset = ReportDataset(prep.annotation.splits[split], prep.tokenizer, cfg.model.max_seq_length,
                            build_transform(cfg.image_size, train), cache=cfg.cache_images, progress=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    workers = cfg.num_workers
    sampler = prep.backend.train_sampler(dataset, cfg.seed) if train else None
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers,
                      collate_fn=collate, pin_memory=cfg.pin_memory and prep.backend.device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=cfg.prefetch_factor if workers else None,
                      generator=generator)


class MetricsLog:
    """Append-only metrics.jsonl; one JSON object per line with stable keys."""

    def __init__(self, path: Path | None):
        self.path = path  # None: a process other than rank 0, which writes nothing

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def evaluate(model: R2GenModel, loader: DataLoader, backend: Backend, tokenizer: Tokenizer,
             cfg: TrainConfig) -> tuple[dict[str, float | None], list[dict], float]:
    """Generate a report for every study; returns metrics, per-study records and samples/s."""
    model.eval()
    records: list[dict] = []
    start = time.perf_counter()
    guard = OomRecovery(loader.batch_size or 1, retries=cfg.oom_retries)

    def generate_in_chunks(images: torch.Tensor, micro: int) -> list[list[int]]:
        out: list[list[int]] = []
        for first in range(0, images.size(0), micro):
            chunk = images[first:first + micro].to(backend.device, non_blocking=True)
            with backend.autocast():
                out += generate(model, chunk, beam_size=cfg.beam_size, block_trigrams=cfg.block_trigrams).cpu().tolist()
        return out

    for batch in loader:
        with torch.no_grad():
            seqs = guard.run(lambda micro: generate_in_chunks(batch["images"], micro), lambda: release_memory(backend))
        generated = tokenizer.decode_batch(seqs)
        truths = tokenizer.decode_batch(batch["targets"][:, 1:].tolist())
        records += [{"id": i, "ground_truth": g, "generated": r} for i, g, r in zip(batch["ids"], truths, generated)]
    speed = len(records) / max(time.perf_counter() - start, 1e-9)
    model.train()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()  # generation's blocks have other shapes than training's: give them back
    scores = compute_scores([r["ground_truth"] for r in records], [r["generated"] for r in records])
    return scores, records, speed


def constant_report_baseline(prep: Prepared) -> dict[str, float | None]:
    """Scores on test of always answering the most frequent train report (the bar to clear)."""
    max_len = prep.cfg.model.max_seq_length
    as_truth = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:])
                for s in prep.annotation.splits["train"]]
    counts = Counter(as_truth)
    constant = min(counts, key=lambda r: (-counts[r], r))
    truths = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:])
              for s in prep.annotation.splits["test"]]
    return compute_scores(truths, [constant] * len(truths))


def split_batch(batch: dict, micro_batch: int) -> list[dict]:
    """Chunks of at most `micro_batch` studies, each trimmed to its own longest report.

    Trimming drops only trailing padding, which the causal decoder and the mask ignore, so a chunk
    computes what the same rows compute inside the whole batch.
    """
    chunks = []
    for start in range(0, len(batch["ids"]), micro_batch):
        rows = slice(start, start + micro_batch)
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
    """
    chunks = split_batch(batch, micro_batch or len(batch["ids"]))
    # DDP averages gradients over processes: divide by the mean token count per process, so the
    # update is the per-token mean over every process's window.
    tokens = backend.all_reduce_sum(target_tokens(batch["masks"]).to(backend.device)) / backend.world_size
    total = torch.zeros((), device=backend.device)
    stepped = True
    for i, chunk in enumerate(chunks):
        images = chunk["images"].to(backend.device, non_blocking=True)
        targets = chunk["targets"].to(backend.device, non_blocking=True)
        masks = chunk["masks"].to(backend.device, non_blocking=True)
        with backend.autocast():
            logprobs = model(images, targets)
        loss = masked_nll(logprobs.float(), targets, masks, tokens)
        total += loss.detach()
        stepped = backend.backward_and_step(loss, model, optimizer, clip_value, step=i == len(chunks) - 1)
    return total.item(), stepped


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
                        lambda: release_memory(backend, optimizer))

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


def release_memory(backend: Backend, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Drop partial gradients and cached blocks after an out-of-memory error."""
    import gc

    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False)


def train(prep: Prepared, run_dir: Path, console: Console | None = None, plan_json: str | None = None) -> RunResult:
    """Run the epochs; writes the run directory (with the launcher's plan.json); returns the final scores."""
    cfg, backend, tokenizer = prep.cfg, prep.backend, prep.tokenizer
    main = backend.is_main  # only rank 0 writes, evaluates and shows progress
    console = (console or Console(stderr=True)) if main else Console(quiet=True)
    seed_everything(cfg.seed)
    model, optimizer = backend.prepare(prep.model, optimizer_factory(cfg))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    # Only rank 0 evaluates: the other processes neither build nor cache the val and test sets.
    loaders = {split: _loader(prep, split, train=split == "train")
               for split in (("train", "val", "test") if main else ("train",))}

    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "reports").mkdir(exist_ok=True)
        write_json(run_dir / "config.json", {"train": cfg.to_dict(), "backend": backend.describe(),
                                             "annotation": str(prep.annotation.path),
                                             "image_dir": str(prep.annotation.image_dir),
                                             "visual_weights": prep.weights_source})
        (run_dir / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        if plan_json is not None:
            write_text(run_dir / "plan.json", plan_json)
    log = MetricsLog(run_dir / "metrics.jsonl" if main else None)

    def save(epoch_done: int, *paths: Path) -> None:
        if main:
            state = _state(backend, model, optimizer, scheduler, cfg, tokenizer, epoch_done, result.steps, best_score)
            for path in paths:
                save_checkpoint(state, path)
    if backend.device.type == "cuda":
        cap_gpu_memory(backend.device, cfg.max_vram_gib)
        torch.cuda.reset_peak_memory_stats(backend.device)

    steps_per_epoch = len(loaders["train"])
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    result = RunResult(run_dir=run_dir, epochs_run=0, steps=0, best_epoch=0)
    best_score = -float("inf")
    train_samples, train_time = 0, 0.0
    oom = OomRecovery(cfg.micro_batch or cfg.batch_size, retries=cfg.oom_retries)
    model.train()
    with _progress(console) as progress:
        task = progress.add_task("train", total=cfg.epochs * steps_per_epoch, info="")
        for epoch in range(1, cfg.epochs + 1):
            epoch_loss, epoch_start, skipped, epoch_samples = 0.0, time.perf_counter(), 0, 0
            if isinstance(getattr(loaders["train"], "sampler", None), torch.utils.data.DistributedSampler):
                loaders["train"].sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
            window_samples, window_start = 0, time.perf_counter()
            for i, batch in enumerate(loaders["train"]):
                if i >= steps_per_epoch:
                    break
                try:
                    loss_value, stepped = oom.step(model, optimizer, backend, batch, cfg.clip_value)
                except OutOfMemoryAtOne as exc:
                    # The failed window never stepped: the weights are those after the last good step.
                    path = run_dir / "checkpoints" / "latest.pt"
                    save(epoch - 1, path)
                    log.write({"step": result.steps, "epoch": epoch, "oom/gave_up": True})
                    raise RunFailed(f"{exc}; saved the last good state to {path}. Free GPU memory (or set "
                                    "--max-vram lower) and start again") from None
                for event in oom.events:
                    log.write({"step": result.steps, "epoch": epoch, **event})
                    console.print(f"[yellow]out of memory:[/] micro-batch {event['oom/micro_batch_from']} -> "
                                  f"{event['oom/micro_batch_to']}, same samples redone", highlight=False)
                oom.events.clear()
                skipped += not stepped
                epoch_loss += loss_value
                result.steps += 1
                window_samples += len(batch["ids"])
                train_samples += len(batch["ids"])
                epoch_samples += len(batch["ids"])
                progress.update(task, advance=1,
                                info=f"epoch {epoch}/{cfg.epochs} loss {loss_value:.3f}")
                if result.steps % cfg.log_every == 0:
                    now = time.perf_counter()
                    log.write({"step": result.steps, "epoch": epoch, "train/loss": loss_value,
                               "lr/visual_extractor": optimizer.param_groups[0]["lr"],
                               "lr/encoder_decoder": optimizer.param_groups[1]["lr"],
                               "perf/samples_per_s": window_samples / max(now - window_start, 1e-9)})
                    window_samples, window_start = 0, now
            epoch_time = time.perf_counter() - epoch_start
            train_time += epoch_time
            epoch_samples = int(backend.all_reduce_sum(torch.tensor(float(epoch_samples))).item())
            scheduler.step()
            result.epochs_run = epoch
            log.write({"step": result.steps, "epoch": epoch, "train/loss_epoch": epoch_loss / max(steps_per_epoch, 1),
                       "train/skipped_steps": skipped, "train/samples": epoch_samples, "time/epoch_s": epoch_time,
                       "train/micro_batch": oom.micro_batch, "oom/recoveries": oom.recoveries})

            last = epoch == cfg.epochs
            stop = False
            if not main:
                pass  # rank 0 evaluates and saves; the others wait at the barrier below
            elif (cfg.val_every and epoch % cfg.val_every == 0) or last:
                progress.update(task, info=f"epoch {epoch}/{cfg.epochs} evaluating val and test")
                record: dict = {"step": result.steps, "epoch": epoch}
                for split in ("val", "test"):
                    scores, reports, speed = evaluate(backend.unwrap(model), loaders[split], backend, tokenizer, cfg)
                    write_json(run_dir / "reports" / f"{split}_epoch{epoch:03d}.json", reports)
                    record.update({f"{split}/{k}": v for k, v in scores.items()})
                    record[f"perf/{split}_generate_samples_per_s"] = speed
                    getattr(result, split).clear()
                    getattr(result, split).update(scores)
                log.write(record)
                score = record[f"val/{MONITOR}"]
                improved = score is not None and score > best_score
                if improved:
                    best_score, result.best_epoch = score, epoch
                checkpoints = run_dir / "checkpoints"
                save(epoch, checkpoints / "latest.pt", *([checkpoints / "best.pt"] if improved else []))
                if epoch - result.best_epoch > cfg.early_stop:
                    console.print(f"early stop: val {MONITOR} did not improve for {epoch - result.best_epoch} epochs")
                    stop = True
            else:
                save(epoch, run_dir / "checkpoints" / "latest.pt")
            if backend.broadcast_flag(stop):
                break
            backend.barrier()
        if result.epochs_run < cfg.epochs:
            progress.update(task, total=result.steps)

    train_samples = int(backend.all_reduce_sum(torch.tensor(float(train_samples))).item())
    result.samples_per_s = train_samples / max(train_time, 1e-9)
    if backend.device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(backend.device) / 2**30
    if not main:
        return result
    result.baseline_test = constant_report_baseline(prep)
    log.write({"step": result.steps, "epoch": result.epochs_run,
               **{f"baseline_test/{k}": v for k, v in result.baseline_test.items()},
               "perf/train_samples_per_s": result.samples_per_s,
               **({"memory/peak_allocated_gib": result.peak_memory_gib} if result.peak_memory_gib else {})})
    return result


def _state(backend: Backend, model, optimizer, scheduler, cfg: TrainConfig, tokenizer: Tokenizer,
           epoch: int, step: int, best_score: float) -> dict:
    return {"model": backend.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "backend": backend.state_dict(), "config": cfg.to_dict(),
            "tokenizer": tokenizer.to_json(), "epoch": epoch, "step": step, "best_score": best_score,
            "monitor": f"val/{MONITOR}"}

