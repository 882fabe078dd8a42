"""The one shared R2Gen training loop: epochs, steps, evaluation, early stopping, checkpoints, metrics.

Read `train` top to bottom: it builds the engine's model and optimizer and the loaders, starts (or
continues) the run directory, then runs the epochs in named blocks; each block calls into the module
that owns its part:
  r2gen.build       what `prepare` validates and builds before anything is written
  r2gen.step        one optimizer step: micro-batches, accumulation, out-of-memory recovery
  r2gen.evaluate    val every epoch, test for the best and the last model, the constant-report baseline
  r2gen.checkpoint  resumable states on a wall-time cadence, best.pt, resuming
  r2gen.state       LoopState, the random states, SIGTERM/Ctrl-C
  r2gen.run_log     metrics.jsonl (and W&B), the progress bar, the epoch line
The engine (an adapter from backends/, seen through r2gen.engine.TrainingEngine) owns devices,
precision and the optimizer step. Faithful to R2Gen's trainer: Adam (amsgrad) with two parameter
groups, StepLR per epoch, masked NLL on teacher-forced reports, clip_grad_value 0.1, beam-search
evaluation on val and test, val BLEU_4 monitored for the best checkpoint and early stop.

Run directory: config.json, tokenizer.json, metrics.jsonl, reports/{val,test}_epochNNN.json,
checkpoints/ (resumable step-N states, best.pt, manifest.json: r2gen.checkpoint.CheckpointStore).
`train(..., resume=checkpoint)` continues a run exactly where a state was saved (LoopState, the
random states, the resumable data order of r2gen.data.order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TaskID

from r2gen.atomic import write_json, write_text
from r2gen.build import Prepared, prepare_model, seed_everything
from r2gen.checkpoint import LoopCheckpoints, load_checkpoint
from r2gen.config import TrainConfig
from r2gen.data.loader import build_loader, workers_ended
from r2gen.data.order import EpochBatchSampler
from r2gen.engine import TrainingEngine
from r2gen.errors import RunFailed
from r2gen.evaluate import constant_report_baseline, evaluate_split
from r2gen.monitor import data_wait_warning, system_stats
from r2gen.run_log import EpochClock, MetricsLog, epoch_line, learning_rates, progress_bar, window_status
from r2gen.state import MONITOR, LoopState, StopRequest
from r2gen.step import NonFiniteLoss, OomRecovery, OutOfMemoryAtOne, start_gpu_memory, warmed_up, warmup_factor
from r2gen.units import GIB


@dataclass
class RunResult:
    """What `train` returns: how far the run went, its last and best scores, the baseline, its speed."""

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

    def take_scores(self, record: dict) -> None:
        """An evaluated epoch's val scores, and its test scores where it was tested."""
        self.val = scores_of(record, "val")
        if "test/BLEU_4" in record:
            self.test = scores_of(record, "test")


def train(prep: Prepared, run_dir: Path, console: Console | None = None, plan_json: str | None = None,
          resume: Path | None = None) -> RunResult:
    """Run the epochs; writes the run directory (with the launcher's plan.json); returns the final scores.

    `resume`: a resumable checkpoint of this run to continue from, exactly where it was saved.
    """
    # -- build: the engine's model and optimizer, the scheduler, the loaders -----------------------------
    cfg, backend, tokenizer = prep.cfg, prep.backend, prep.tokenizer
    main = backend.is_main  # only rank 0 writes, evaluates and shows progress
    console = (console or Console(stderr=True)) if main else Console(quiet=True)
    seed_everything(cfg.seed)
    model, optimizer = prepare_model(backend, prep.model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    # Only rank 0 evaluates: the other processes neither build nor cache the val and test sets.
    loaders = {split: build_loader(prep, split, train=split == "train")
               for split in (("train", "val", "test") if main else ("train",))}

    # -- the run directory: continue where a state was saved, or start it -------------------------------
    checkpoints = LoopCheckpoints(run_dir, backend, model, optimizer, scheduler, cfg, tokenizer, plan_json)
    loop = checkpoints.resume(resume) if resume is not None else LoopState()
    log = start_run_dir(run_dir, prep, plan_json) if main else MetricsLog(None)
    # evaluate_on(split, epoch, name=split): scores of the model as it is, as `name/...`; the reports written.
    evaluate_on = partial(evaluate_split, backend.unwrap(model), loaders, backend, tokenizer, cfg, run_dir / "reports")

    # -- before the first step: GPU memory (cap, peak), the data from the first window not yet done -----
    start_gpu_memory(backend.device, cfg.max_vram_gib)
    windows: EpochBatchSampler = loaders["train"].batch_sampler
    windows.start_at(loop.epoch, loop.position)
    train_batches, steps_per_epoch = iter(loaders["train"]), windows.steps_per_epoch
    result = RunResult(run_dir=run_dir, epochs_run=loop.epoch - 1, steps=loop.steps, best_epoch=loop.best_epoch)
    oom = OomRecovery(cfg.micro_batch or cfg.window_size, retries=cfg.oom_retries)
    model.train()
    with progress_bar(console) as progress, StopRequest() as stop, checkpoints.writing(), \
            workers_ended(loaders, on_error_only=True):  # the final evaluation still reads val and test
        task = progress.add_task("train", total=cfg.epochs * steps_per_epoch, completed=loop.steps, info="")
        while loop.epoch <= cfg.epochs:
            epoch, clock = loop.epoch, EpochClock()
            while loop.position < steps_per_epoch:
                # -- a step: the next window, in micro-batches, one optimizer step (r2gen.step) ----------
                batch = next(train_batches)
                clock.got_batch()
                try:
                    with warmed_up(optimizer, warmup_factor(loop.steps, cfg.warmup_steps)):
                        loss_value, stepped = oom.step(model, optimizer, backend, batch, cfg.clip_value)
                    loop.nonfinite_run = 0
                except NonFiniteLoss as exc:  # the window is consumed without a step
                    skip_nonfinite_window(exc, loop, epoch, backend, cfg, log, console, checkpoints)
                    clock.ready()
                    continue
                except OutOfMemoryAtOne as exc:  # the failed window never stepped: the last good state is saved
                    log.write({"step": loop.steps, "epoch": epoch, "oom/gave_up": True})
                    raise RunFailed(f"{exc}; saved the last good state to {checkpoints.save(loop)}. Free GPU memory "
                                    "(or set --max-vram lower) and continue with --keep-training") from None
                report_oom_recoveries(oom, loop, epoch, log, console)
                loop.count_window(len(batch["ids"]), loss_value, stepped)
                clock.count_window(batch)

                # -- every log_every steps: loss, learning rates, throughput, data wait, the machine -----
                if loop.steps % cfg.log_every == 0:
                    rates = clock.close_window()
                    factor = warmup_factor(loop.steps - 1, cfg.warmup_steps)  # the rate this step used
                    log.write({"step": loop.steps, "epoch": epoch, "train/loss": loss_value,
                               **learning_rates(optimizer, factor), **rates, **system_stats(backend.device)})
                    warning = data_wait_warning(rates["perf/data_wait_pct"], cfg.num_workers)
                    if warning and not clock.warned:  # once per epoch
                        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
                        clock.warned = True
                    progress.update(task, info=window_status(epoch, cfg.epochs, loss_value, rates))
                progress.update(task, advance=1)

                # -- a stop signal or the step cadence: save (every process stops after the same step) ---
                stopping = bool(backend.all_reduce_sum(torch.tensor(float(stop.signal is not None))).item())
                clock.ready()
                if stopping or (cfg.save_every and loop.steps % cfg.save_every == 0):
                    clock.bank(loop)
                    path = checkpoints.save(loop)
                    backend.barrier()
                    clock.ready()  # saving is not waiting for data
                    if stopping:
                        raise stop.stopped(loop.steps, path)

            # -- the epoch's end: its loss and samples (all processes), the scheduler's step -------------
            clock.bank(loop)
            train_s = clock.elapsed()
            epoch_samples = int(backend.all_reduce_sum(torch.tensor(float(loop.epoch_samples))).item())
            epoch_loss = loop.epoch_loss / max(steps_per_epoch, 1)
            scheduler.step()
            result.epochs_run = epoch
            log.write({"step": loop.steps, "epoch": epoch, "train/loss_epoch": epoch_loss,
                       "train/samples": epoch_samples, "train/skipped_steps": loop.skipped,
                       "train/nonfinite_steps": loop.nonfinite, "train/micro_batch": oom.micro_batch,
                       "oom/recoveries": oom.recoveries})

            # -- evaluation on rank 0: val every val_every epochs and at the end (test too, where due) -----
            last, stop_early, val_scores, improved = epoch == cfg.epochs, False, None, False
            if main and ((cfg.val_every and epoch % cfg.val_every == 0) or last):
                record, improved, stop_early = evaluate_epoch(evaluate_on, loop, epoch, cfg, console, progress, task)
                val_scores = {k: record.get(f"val/{k}") for k in ("BLEU_4", "CIDEr", "findings_macro_f1")}
                result.take_scores(record)
                log.write(record)

            # -- checkpoints: a resumable state on the wall-time cadence (always at the end), best.pt ----
            stop_now = backend.broadcast_flag(stop_early)
            loop.next_epoch()  # a state saved now continues with the next epoch
            checkpoints.save_if_due(loop, final=last or stop_now)
            if main and improved:
                checkpoints.save_best(loop, epoch)
            if not console.is_terminal:
                console.print(epoch_line(epoch, cfg.epochs, loop.steps, epoch_loss, epoch_samples / train_s,
                                         100 * clock.wait_s / train_s, clock.elapsed(), val_scores),
                              highlight=False, soft_wrap=True)
            if stop_now:
                break
            backend.barrier()
        if result.epochs_run < cfg.epochs:
            progress.update(task, total=loop.steps)

    # -- the end: throughput and peak memory; on rank 0 the best model on test, the baseline -----------
    with checkpoints.writing(last=True), workers_ended(loaders):  # the last state is written meanwhile
        finish(prep, result, loop, backend.unwrap(model), checkpoints, evaluate_on, log, console)
    return result


def start_run_dir(run_dir: Path, prep: Prepared, plan_json: str | None) -> MetricsLog:
    """The run directory's folders and what the run was started with (config.json, tokenizer.json,
    plan.json); its metrics log, opened (rank 0)."""
    cfg = prep.cfg
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "reports").mkdir(exist_ok=True)
    write_json(run_dir / "config.json", {"train": cfg.to_dict(), "backend": prep.backend.describe(),
                                         "annotation": str(prep.annotation.path),
                                         "image_dir": str(prep.annotation.image_dir),
                                         "visual_weights": prep.weights_source,
                                         **({"init_from": str(prep.init_from)} if prep.init_from else {})})
    write_text(run_dir / "tokenizer.json", prep.tokenizer.to_json())
    if plan_json is not None:
        write_text(run_dir / "plan.json", plan_json)
    return MetricsLog.of_run(run_dir, cfg, plan_json)


def scores_of(record: dict, name: str) -> dict:
    """The record's `name/...` scores, without the prefix ({} where it has none)."""
    return {k.removeprefix(f"{name}/"): v for k, v in record.items() if k.startswith(f"{name}/")}


def skip_nonfinite_window(exc: NonFiniteLoss, loop: LoopState, epoch: int, backend: TrainingEngine,
                          cfg: TrainConfig, log: MetricsLog, console: Console, checkpoints: LoopCheckpoints) -> None:
    """A window whose loss was not finite is consumed without a step (the weights stay those after the
    last good step). Too many in a row, or an engine that cannot redo a step, ends the run: the state
    is saved and RunFailed raised."""
    loop.count_nonfinite()
    log.write({"step": loop.steps, "epoch": epoch, "train/nonfinite_loss": True})
    console.print(f"[yellow]skipped step {loop.steps}:[/] {exc}", highlight=False)
    if loop.nonfinite_run >= cfg.max_nonfinite or not backend.can_redo_step:
        path = checkpoints.save(loop)
        why = (f"{loop.nonfinite_run} windows in a row" if backend.can_redo_step else
               f"{backend.name} keeps the window's partial gradients")
        raise RunFailed(f"the loss was not finite ({why}); saved the state after the last good "
                        f"step to {path}. Lower the learning rates or use bf16/fp32, then continue "
                        "with --keep-training") from None


def report_oom_recoveries(oom: OomRecovery, loop: LoopState, epoch: int, log: MetricsLog, console: Console) -> None:
    """Each out-of-memory recovery of the last step (a smaller micro-batch, the same samples redone), logged once."""
    for event in oom.events:
        log.write({"step": loop.steps, "epoch": epoch, **event})
        console.print(f"[yellow]out of memory:[/] micro-batch {event['oom/micro_batch_from']} -> "
                      f"{event['oom/micro_batch_to']}, same samples redone", highlight=False)
    oom.events.clear()


def evaluate_epoch(evaluate_on: Callable[..., dict], loop: LoopState, epoch: int, cfg: TrainConfig, console: Console,
                   progress: Progress, task: TaskID) -> tuple[dict, bool, bool]:
    """Val, and test for the last model, before an early stop and every test_every epochs (the best model
    is tested after the loop): (the epoch's record, whether val MONITOR improved on the best, whether to
    stop early: no improvement for more than early_stop epochs)."""
    progress.update(task, info=f"epoch {epoch}/{cfg.epochs} evaluating val")
    record: dict = {"step": loop.steps, "epoch": epoch, **evaluate_on("val", epoch)}
    improved = loop.improves(record[f"val/{MONITOR}"], epoch)
    stop_early = epoch - loop.best_epoch > cfg.early_stop
    if stop_early:
        console.print(f"early stop: val {MONITOR} did not improve for {epoch - loop.best_epoch} epochs")
    if epoch == cfg.epochs or stop_early or (cfg.test_every and epoch % cfg.test_every == 0):
        progress.update(task, info=f"epoch {epoch}/{cfg.epochs} evaluating test")
        record.update(evaluate_on("test", epoch))
    return record, improved, stop_early


def finish(prep: Prepared, result: RunResult, loop: LoopState, model: torch.nn.Module, checkpoints: LoopCheckpoints,
           evaluate_on: Callable[..., dict], log: MetricsLog, console: Console) -> None:
    """After the last epoch, on every process: the steps, samples/s (all processes, across resumes) and
    peak memory; on rank 0: the best val epoch's model on test (R2Gen reports its scores), the
    constant-report baseline on val and test, the final record; the log closed."""
    backend = prep.backend
    result.steps, result.best_epoch = loop.steps, loop.best_epoch
    train_samples = int(backend.all_reduce_sum(torch.tensor(float(loop.train_samples))).item())
    result.samples_per_s = train_samples / max(loop.train_time_s, 1e-9)
    if backend.device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(backend.device) / GIB
    if not backend.is_main:
        return
    best_pt = checkpoints.store.best_path
    checkpoints.best_written()
    if result.test and loop.best_epoch and loop.best_epoch != result.epochs_run and best_pt.is_file():
        console.print(f"evaluating the best model (epoch {loop.best_epoch}) on test", highlight=False)
        model.load_state_dict(load_checkpoint(best_pt)["model"])
        record = {"step": loop.steps, "epoch": result.epochs_run, "best_epoch": loop.best_epoch,
                  **evaluate_on("test", loop.best_epoch, "best_test")}
        result.best_test = scores_of(record, "best_test")
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
