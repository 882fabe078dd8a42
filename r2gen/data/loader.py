"""The data loaders of a run: training windows in the resumable epoch order, evaluation batches.

`build_loader` is the one place a DataLoader is made (the loop, `r2gen-launch evaluate`, bench/).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader

from r2gen.build import Prepared
from r2gen.data.datasets import ReportDataset, build_transform, collate
from r2gen.data.order import EpochBatchSampler, EpochSampler
from r2gen.model.visual_extractor import smallest_micro_batch


def _worker_leaves_stop_signals_to_the_loop(_: int) -> None:
    """A loader worker ignores SIGTERM and Ctrl-C: `timeout`, a scheduler's job kill (SLURM signals
    every process of the job) and Ctrl-C reach the whole process group, and a worker that died of it
    crashed the loop ("DataLoader worker ... is killed by signal: Terminated", seen on the GPU host)
    before it could finish the step and save. The loop acts on the signal and ends its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def end_workers(loaders: Iterable[DataLoader]) -> None:
    """Ends the loaders' persistent worker processes now (the next iteration starts new ones). They
    ignore SIGTERM (above), so a process exiting while it still held a loader would wait for them
    forever: multiprocessing terminates and then joins its children at exit."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps a persistent iteration
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None


@contextmanager
def workers_ended(loaders: dict[str, DataLoader], on_error_only: bool = False) -> Iterator[None]:
    """end_workers(loaders) when the block ends (on_error_only: when it raises)."""
    try:
        yield
    except BaseException:
        end_workers(loaders.values())
        raise
    if not on_error_only:
        end_workers(loaders.values())


def build_loader(prep: Prepared, split: str, train: bool) -> DataLoader:
    """The loader of `split`: for training, this process's windows (loader batches) of every epoch from
    one iteration; else the split in its order, in generation batches (TrainConfig.eval_batch)."""
    cfg = prep.cfg
    dataset = ReportDataset(prep.annotation.splits[split], prep.tokenizer, cfg.model.max_seq_length,
                            build_transform(cfg.image_size, train), cache=cfg.cache_images, progress=True,
                            uint8=cfg.uint8_images)
    workers = cfg.num_workers
    # Training: this process's share of one shuffle per epoch in windows, epoch after epoch from one
    # iteration (the workers prepare the next epoch while this one ends), resumable at any window.
    batching = (dict(batch_sampler=EpochBatchSampler(
        EpochSampler(len(dataset), cfg.seed, prep.backend.rank, prep.backend.world_size), cfg.window_size,
        cfg.max_steps_per_epoch, cfg.epochs, smallest_micro_batch(cfg.image_size))) if train
        else dict(batch_size=cfg.eval_batch(len(dataset))))
    # A private generator: starting an iteration must not draw from the global RNG, or a resumed
    # run's dropout would drift from the uninterrupted one's.
    return DataLoader(dataset, **batching, num_workers=workers,
                      collate_fn=collate, pin_memory=cfg.pin_memory and prep.backend.device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=cfg.prefetch_factor if workers else None,
                      worker_init_fn=_worker_leaves_stop_signals_to_the_loop if workers else None,
                      generator=torch.Generator().manual_seed(cfg.seed))
