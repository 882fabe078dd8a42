"""The training order: one shuffle per epoch, shared out over processes, resumable at any batch.

`EpochSampler` yields `(index, augmentation seed)` pairs. The order depends only on (seed,
epoch); each sample's seed on (seed, epoch, index): the same epoch gives the same images in the
same order whichever loader worker decodes them and however many there are (or processes share
the epoch), and an epoch can start at any position (--keep-training resumes mid-epoch with exactly the batches it had not seen).
Several processes take interleaved shares of one permutation, padded by repeating its first
indices so that every process has as many (as torch's DistributedSampler).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[tuple[int, int]]):
    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError("EpochSampler: the data set is empty")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 1, 0

    @property
    def per_process(self) -> int:
        """Samples each process sees per epoch."""
        return -(-self.size // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to iterate next, skipping this process's first `start` samples of it."""
        if not 0 <= start <= self.per_process:
            raise ValueError(f"start {start} is outside the epoch's {self.per_process} samples")
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """This process's indices for the current epoch, from its first sample."""
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        permutation = torch.randperm(self.size, generator=generator).tolist()
        total = self.per_process * self.world_size
        permutation += permutation[: total - self.size]
        return permutation[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.order()):
            if position >= self.start:
                yield index, _mix(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.per_process - self.start


def chunk_sizes(total: int, size: int) -> list[int]:
    """`total` items in chunks of `size`, the last one shorter (23 in 5s: 5, 5, 5, 5, 3)."""
    return [size] * (total // size) + ([total % size] if total % size else [])


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """EpochSampler's order in training windows of `window_size`, one epoch after another without a
    pause: a loader iterated once over it keeps its workers busy across epoch boundaries, so the
    next epoch's first windows are ready when the last one ends (a loader restarted per epoch
    stalls while one worker assembles a whole first window: 12% of a step's time was seen at
    micro-batch 736 on an H200).

    Windows never straddle epochs: an epoch ends with its shorter last window, or after
    `max_steps_per_epoch` windows. A last window under `smallest` studies (a model that cannot
    train on one, see smallest_micro_batch) is joined to the window before: a window holds more
    than `smallest`, so the joined window ends up with the extra study. Iteration starts at
    `set_epoch(epoch, start)` and ends after `last_epoch` (0 = never).
    """

    def __init__(self, epochs: EpochSampler, window_size: int, max_steps_per_epoch: int = 0, last_epoch: int = 0,
                 smallest: int = 1):
        if window_size < 1:
            raise ValueError("EpochBatchSampler: window_size must be positive")
        self.epochs, self.window_size = epochs, window_size
        self.max_steps_per_epoch, self.last_epoch = max_steps_per_epoch, last_epoch
        # Whole batches but for the last (a resumed run starts at a multiple of window_size).
        self.windows = chunk_sizes(epochs.per_process, window_size)
        if len(self.windows) > 1 and self.windows[-1] < smallest:
            self.windows[-2:] = [self.windows[-2] + self.windows[-1]]

    @property
    def per_process(self) -> int:
        return self.epochs.per_process

    @property
    def steps_per_epoch(self) -> int:
        """Windows (optimizer steps) in a whole epoch."""
        steps = len(self.windows)
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate from `epoch`, skipping this process's first `start` samples of it."""
        self.epochs.set_epoch(epoch, start)

    def start_at(self, epoch: int, window: int) -> None:
        """Iterate from window `window` of `epoch` (a resumed run: the first window not yet trained)."""
        self.set_epoch(epoch, start=min(window * self.window_size, self.per_process))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epochs.epoch, self.epochs.start
        while not self.last_epoch or epoch <= self.last_epoch:
            order = EpochSampler(self.epochs.size, self.epochs.seed, self.epochs.rank, self.epochs.world_size)
            order.set_epoch(epoch, start)
            items = list(order)  # this epoch from `start`, a window's beginning (a resumed run)
            begin = 0
            for size in self.windows[:self.steps_per_epoch]:
                if begin >= start:
                    yield items[begin - start:begin - start + size]
                begin += size
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        """Windows left in the epoch set by set_epoch (the loop counts its own steps across epochs)."""
        return max(self.steps_per_epoch - self.epochs.start // self.window_size, 0)
