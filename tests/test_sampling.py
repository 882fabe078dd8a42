"""The training order: reproducible per epoch, resumable at any position, shared over processes,
and the same images whichever loader worker decodes them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from r2gen.data.datasets import ReportDataset, build_transform, collate
from r2gen.data.order import EpochSampler


def test_order_follows_seed_and_epoch_only() -> None:
    a, b = EpochSampler(50, seed=7), EpochSampler(50, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(i for i, _ in a) == list(range(50))
    b.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert len({s for _, s in a}) == 50  # a seed per sample


@pytest.mark.parametrize("start", [0, 1, 17, 50])
def test_an_epoch_resumes_at_any_position(start: int) -> None:
    sampler = EpochSampler(50, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=start)
    assert list(sampler) == whole[start:] and len(sampler) == 50 - start
    with pytest.raises(ValueError):
        sampler.set_epoch(2, start=51)


def test_processes_share_one_permutation() -> None:
    shares = []
    for rank in range(3):
        sampler = EpochSampler(10, seed=0, rank=rank, world_size=3)
        sampler.set_epoch(1)
        shares.append([i for i, _ in sampler])
    assert [len(s) for s in shares] == [4, 4, 4]  # padded by repeating the permutation's first indices
    assert set(sum(shares, [])) == set(range(10))


@pytest.mark.parametrize("cache", [False, True])
def test_augmented_images_do_not_depend_on_the_worker(small_set, cache: bool) -> None:
    from r2gen.data.datasets import load_annotation
    from r2gen.data.tokenizer import Tokenizer

    annotation = load_annotation(small_set, None, "iu_xray")
    tokenizer = Tokenizer.from_reports("iu_xray", (s.report for s in annotation.splits["train"]), 1)
    dataset = ReportDataset(annotation.splits["train"], tokenizer, 60, build_transform(32, True), cache=cache)
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(len(dataset), seed=5)
        sampler.set_epoch(1, start=3)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate)
        batches[workers] = [b["images"] for b in loader]
    assert all(torch.equal(x, y) for x, y in zip(batches[0], batches[2]))
    sampler = EpochSampler(len(dataset), seed=5)
    sampler.set_epoch(1)
    first = next(iter(DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate)))["images"]
    assert not torch.equal(first, first.flip(-1))  # the augmentation is really random per sample


def test_windows_run_epoch_after_epoch_as_the_per_epoch_order_cut_in_batches() -> None:
    from r2gen.data.order import EpochBatchSampler

    def per_epoch(epoch: int, start: int = 0) -> list[list[tuple[int, int]]]:
        sampler = EpochSampler(23, seed=4)
        sampler.set_epoch(epoch, start)
        items = list(sampler)
        return [items[i:i + 5] for i in range(0, len(items), 5)]

    windows = EpochBatchSampler(EpochSampler(23, seed=4), 5, last_epoch=3)
    assert windows.steps_per_epoch == 5 and len(windows) == 5
    assert list(windows) == per_epoch(1) + per_epoch(2) + per_epoch(3)  # the last window of each is short
    windows.set_epoch(2, start=10)  # a resumed run: epoch 2 after its first two windows
    assert len(windows) == 3
    assert list(windows) == per_epoch(2, 10) + per_epoch(3)
    windows.set_epoch(2, start=23)  # stopped after an epoch's last window: the next epoch follows
    assert list(windows) == per_epoch(3)
    cut = EpochBatchSampler(EpochSampler(23, seed=4), 5, max_steps_per_epoch=2, last_epoch=2)
    assert list(cut) == per_epoch(1)[:2] + per_epoch(2)[:2]
    endless = iter(EpochBatchSampler(EpochSampler(23, seed=4), 5))
    assert [next(endless) for _ in range(15)] == per_epoch(1) + per_epoch(2) + per_epoch(3)


def test_a_last_window_the_model_cannot_train_on_joins_the_one_before() -> None:
    """32 px images: BatchNorm cannot train on one study (the tiny preset crashed at an epoch's end
    whose last window held one)."""
    from r2gen.data.order import EpochBatchSampler

    sampler = EpochSampler(21, seed=4)
    sampler.set_epoch(1)
    items = list(sampler)
    windows = EpochBatchSampler(EpochSampler(21, seed=4), 4, last_epoch=1, smallest=2)
    assert windows.steps_per_epoch == 5 and len(windows) == 5
    assert list(windows) == [items[0:4], items[4:8], items[8:12], items[12:16], items[16:21]]
    windows.set_epoch(1, start=16)  # resumed before the joined window
    assert list(windows) == [items[16:21]]
    assert EpochBatchSampler(EpochSampler(21, seed=4), 4, smallest=1).steps_per_epoch == 6
    assert EpochBatchSampler(EpochSampler(22, seed=4), 4, smallest=2).steps_per_epoch == 6  # last window 2
    assert EpochBatchSampler(EpochSampler(1, seed=4), 4, smallest=2).steps_per_epoch == 1  # nothing to join


@pytest.mark.parametrize("total,micro,smallest,sizes", [
    (16, 8, 1, [8, 8]), (9, 8, 1, [8, 1]), (9, 8, 2, [7, 2]), (9, 4, 2, [4, 3, 2]), (3, 2, 2, [3]),
    (5, 1, 2, [2, 3]), (1, 4, 2, [1]), (4, 8, 2, [4]),
])
def test_micro_batches_never_end_under_the_smallest_size(total: int, micro: int, smallest: int,
                                                         sizes: list[int]) -> None:
    from r2gen.step import micro_batch_sizes

    assert micro_batch_sizes(total, micro, smallest) == sizes


def test_split_batch_keeps_micro_batches_at_the_smallest_size() -> None:
    from r2gen.step import split_batch

    def batch(size: int) -> dict:
        return {"ids": [str(i) for i in range(9)], "images": torch.zeros(9, 2, 3, size, size),
                "targets": torch.ones(9, 5, dtype=torch.long), "masks": torch.ones(9, 5, dtype=torch.long)}

    assert [len(c["ids"]) for c in split_batch(batch(32), 8, smallest=2)] == [7, 2]
    assert [len(c["ids"]) for c in split_batch(batch(32), 8)] == [8, 1]
    chunks = split_batch(batch(32), 8, smallest=2)
    assert [i for c in chunks for i in c["ids"]] == [str(i) for i in range(9)]  # every study once, in order
