"""Micro-batches, accumulation windows normalized per token, out-of-memory recovery (injected OOMs
on CPU), and the in-RAM image cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from backends.plain import PlainBackend
from r2gen.build import prepare
from r2gen.checkpoint import CheckpointStore, load_checkpoint
from r2gen.config import preset
from r2gen.data.datasets import ReportDataset, build_transform, collate, load_annotation
from r2gen.errors import RunFailed
from r2gen.model.r2gen import masked_nll
from r2gen.step import OomRecovery, OutOfMemoryAtOne, split_batch, train_step
from r2gen.train import train


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


def _cfg(**changes):
    base = dict(image_size=32, window_size=7, num_workers=0, log_every=1, val_every=0, beam_size=1, epochs=2)
    return preset("tiny").replace(**{**base, **changes})


@pytest.fixture(scope="module")
def setup(small_set: Path):
    ann = load_annotation(small_set)
    prep = prepare(_cfg(), PlainBackend("cpu"), ann, None)
    dataset = ReportDataset(ann.splits["train"], prep.tokenizer, 60, build_transform(32, train=False))
    batch = collate([dataset[i] for i in range(7)])
    return prep, batch


def _fresh(prep):
    """A float64 copy (the loss itself is fp32, as in training) of the model in eval mode (no dropout, fixed BatchNorm statistics), SGD lr 1."""
    model = type(prep.model)(prep.cfg.model, len(prep.tokenizer))
    model.load_state_dict(prep.model.state_dict())
    model.double().eval()
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def _as_double(batch: dict) -> dict:
    return {**batch, "images": batch["images"].double()}


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# The bounds of "the same step", from the arithmetic (the per-call averaging bug below moves the loss
# by 4e-3 and the weights by 5e-2):
# - weights: float64, and the loss's per-token gradient is the same fp32 number (1/tokens) on both
#   paths, so the updates differ only by float64 summation order: 2^-53 per operation, worst case
#   n * 2^-53 * sum|terms| for the ResNet's sums of up to ~1e5 terms of order 1 (seen: 2e-15).
# - loss: fp32 (as in training), ~400 token NLLs summed in other groupings; each order is within
#   ~15 units of fp32 roundoff of the exact sum (cascade summation of positive terms: log2(n) + 1,
#   the fp32 cast of each term, the micro-batch additions), so 64 units bound the difference.
WEIGHT_ATOL = 1e-10
LOSS_REL = 64 * 2.0**-24


def test_split_batch_chunks_and_trims(setup) -> None:
    _, batch = setup
    chunks = split_batch(batch, 3)
    assert [len(c["ids"]) for c in chunks] == [3, 3, 1]
    assert [i for c in chunks for i in c["ids"]] == batch["ids"]
    for c in chunks:
        width = int(c["masks"].sum(1).max())
        assert c["targets"].shape[1] == c["masks"].shape[1] == width
        assert c["masks"][:, -1].any()  # no all-padding column left at the end
    assert torch.equal(torch.cat([c["images"] for c in chunks]), batch["images"])


@pytest.mark.parametrize("micro", [1, 2, 3, 5])
def test_micro_batches_give_the_whole_batch_step(setup, micro: int) -> None:
    """Per-token normalization over the window: any micro-batch size (even ones that leave an
    uneven last chunk) gives the same update as one step on the whole batch."""
    prep, batch = setup
    backend = PlainBackend("cpu")
    ref, ref_opt = _fresh(prep)
    ref_loss, _ = train_step(ref, ref_opt, backend, _as_double(batch), clip_value=1e9)
    model, opt = _fresh(prep)
    loss, stepped = train_step(model, opt, backend, _as_double(batch), clip_value=1e9, micro_batch=micro)
    assert stepped and loss == pytest.approx(ref_loss, rel=LOSS_REL)
    torch.testing.assert_close(_params(model), _params(ref), rtol=0, atol=WEIGHT_ATOL)


def test_per_call_averaging_would_differ(setup) -> None:
    """The check above can fail: averaging per-micro-batch means is not the per-token mean."""
    prep, batch = setup
    model, _ = _fresh(prep)
    with torch.no_grad():
        chunks = split_batch(_as_double(batch), 3)
        per_call = sum(masked_nll(model(c["images"], c["targets"]), c["targets"], c["masks"]) for c in chunks) / 3
        whole = masked_nll(model(_as_double(batch)["images"], batch["targets"]), batch["targets"], batch["masks"])
    assert abs(per_call.item() - whole.item()) > 1e-3


class _OomAbove:
    """Injects torch.OutOfMemoryError into the real model's forward: above `limit` studies, or on
    the listed forward calls (counted from 1), as a GPU would when memory runs out."""

    def __init__(self, model, limit: int = 10**9, fail_calls: tuple[int, ...] = ()):
        self.forward, self.limit, self.fail_calls, self.calls = model.forward, limit, fail_calls, 0
        model.forward = self

    def __call__(self, images, targets):
        self.calls += 1
        if images.size(0) > self.limit or self.calls in self.fail_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.forward(images, targets)


def test_oom_halves_the_micro_batch_and_redoes_the_same_samples(setup) -> None:
    prep, batch = setup
    backend = PlainBackend("cpu")
    model, opt = _fresh(prep)
    _OomAbove(model, limit=2)
    guard = OomRecovery(micro_batch=7, wait_s=0)
    loss, stepped = guard.step(model, opt, backend, _as_double(batch), clip_value=1e9)
    assert guard.micro_batch == 1
    assert [e["oom/micro_batch_to"] for e in guard.events] == [3, 1] and guard.recoveries == 2
    ref, ref_opt = _fresh(prep)
    ref_loss, _ = train_step(ref, ref_opt, backend, _as_double(batch), clip_value=1e9)
    assert stepped and loss == pytest.approx(ref_loss, rel=LOSS_REL)
    torch.testing.assert_close(_params(model), _params(ref), rtol=0, atol=WEIGHT_ATOL)


def test_oom_in_the_middle_of_a_window_discards_partial_gradients(setup) -> None:
    prep, batch = setup
    backend = PlainBackend("cpu")
    model, opt = _fresh(prep)
    injected = _OomAbove(model, fail_calls=(3,))  # chunks 1 and 2 backwarded, chunk 3 fails
    guard = OomRecovery(micro_batch=3, wait_s=0)
    guard.step(model, opt, backend, _as_double(batch), clip_value=1e9)
    assert guard.micro_batch == 1 and injected.calls == 3 + 7
    ref, ref_opt = _fresh(prep)
    train_step(ref, ref_opt, backend, _as_double(batch), clip_value=1e9)
    torch.testing.assert_close(_params(model), _params(ref), rtol=0, atol=WEIGHT_ATOL)


def test_oom_at_one_retries_then_gives_up(setup) -> None:
    prep, batch = setup
    model, opt = _fresh(prep)
    injected = _OomAbove(model, limit=0)
    guard = OomRecovery(micro_batch=4, retries=2, wait_s=0)
    before = _params(model).clone()
    with pytest.raises(OutOfMemoryAtOne, match="micro-batch 1 after 2 retries"):
        guard.step(model, opt, PlainBackend("cpu"), _as_double(batch), clip_value=0.1)
    assert injected.calls == 5  # 4, 2, 1, then two retries at 1
    assert torch.equal(_params(model), before) and all(p.grad is None for p in model.parameters())


def test_loop_recovers_and_counts_every_sample(small_set: Path, tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    # 64 px: a chunk of one study still has 2x2 features for BatchNorm in training mode.
    prep = prepare(_cfg(window_size=8, micro_batch=8, image_size=64), PlainBackend("cpu"), ann, None)
    _OomAbove(prep.model, limit=3)
    result = train(prep, tmp_path / "run", _quiet())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if "oom/micro_batch_to" in r]
    assert [(e["oom/micro_batch_from"], e["oom/micro_batch_to"]) for e in events] == [(8, 4), (4, 2)]
    epochs = [r for r in records if "train/samples" in r]
    n_train = len(ann.splits["train"])
    assert [r["train/samples"] for r in epochs] == [n_train, n_train]
    assert [r["train/micro_batch"] for r in epochs] == [2, 2] and epochs[-1]["oom/recoveries"] == 2
    assert result.steps == 2 * -(-n_train // 8)  # optimizer steps are unchanged by the recovery


def test_loop_gives_up_with_a_checkpoint(small_set: Path, tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    prep = prepare(_cfg(oom_retries=0), PlainBackend("cpu"), ann, None)
    _OomAbove(prep.model, fail_calls=tuple(range(4, 100)))  # three good windows, then nothing fits
    with pytest.raises(RunFailed, match="saved the last good state to .*step-00000003.pt") as info:
        train(prep, tmp_path / "run", _quiet())
    assert info.value.exit_code == 1 and "--keep-training" in str(info.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003.pt")
    assert state["step"] == 3
    model = type(prep.model)(prep.cfg.model, len(prep.tokenizer))
    model.load_state_dict(state["model"])


@pytest.mark.parametrize("train_split", [True, False])
def test_image_cache_gives_identical_items(small_set: Path, train_split: bool) -> None:
    ann = load_annotation(small_set)
    prep = prepare(_cfg(), PlainBackend("cpu"), ann, None)
    studies = ann.splits["train"][:5]
    plain = ReportDataset(studies, prep.tokenizer, 60, build_transform(48, train_split))
    cached = ReportDataset(studies, prep.tokenizer, 60, build_transform(48, train_split), cache=True)
    assert cached.cached is not None and cached.cached[0][0].dtype.name == "uint8"
    for i in range(len(studies)):
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = cached[i]
        assert a[0] == b[0] and a[2] == b[2]
        assert torch.equal(a[1], b[1])


def test_generation_recovers_from_oom_with_identical_reports(small_set: Path) -> None:
    from r2gen.data.loader import build_loader
    from r2gen.evaluate import evaluate

    ann = load_annotation(small_set)
    prep = prepare(_cfg(beam_size=2), PlainBackend("cpu"), ann, None)
    loader = build_loader(prep, "test", train=False)
    _, reference, _ = evaluate(prep.model, loader, prep.backend, prep.tokenizer, prep.cfg)
    encode = prep.model.encode_features  # generation's first step
    sizes: list[int] = []

    def limited(att_feats):
        sizes.append(att_feats.size(0))
        if att_feats.size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return encode(att_feats)

    prep.model.encode_features = limited
    _, records, _ = evaluate(prep.model, loader, prep.backend, prep.tokenizer, prep.cfg)
    assert records == reference and sizes == [6, 3] + [1] * 6  # 6 fails, 3 fails, then one study at a time


class _NanOn:
    """Makes the real model's output NaN on the listed forward calls (counted from 1)."""

    def __init__(self, model, calls: tuple[int, ...]):
        self.forward, self.nan_calls, self.calls = model.forward, calls, 0
        model.forward = self

    def __call__(self, images, targets):
        self.calls += 1
        out = self.forward(images, targets)
        return out * float("nan") if self.calls in self.nan_calls else out


def test_a_nonfinite_window_is_skipped_and_counted(small_set: Path, tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    prep = prepare(_cfg(micro_batch=4), PlainBackend("cpu"), ann, None)
    _NanOn(prep.model, calls=(3,))  # the second window's first micro-batch (two micro-batches per window)
    result = train(prep, tmp_path / "run", _quiet())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("train/nonfinite_loss")] == [2]
    assert [r["train/nonfinite_steps"] for r in records if "train/nonfinite_steps" in r] == [1, 0]
    assert result.steps == 2 * 3 and all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    weights = load_checkpoint(CheckpointStore(tmp_path / "run" / "checkpoints").newest_intact()[0])["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_nonfinite_windows_in_a_row_stop_the_run_with_the_last_good_state(small_set: Path, tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    prep = prepare(_cfg(max_nonfinite=2), PlainBackend("cpu"), ann, None)
    _NanOn(prep.model, calls=tuple(range(2, 100)))  # one good window, then only NaN
    with pytest.raises(RunFailed, match="2 windows in a row.*--keep-training") as info:
        train(prep, tmp_path / "run", _quiet())
    assert info.value.exit_code == 1
    state = load_checkpoint(CheckpointStore(tmp_path / "run" / "checkpoints").newest_intact()[0])
    assert state["step"] == 3 and state["loop"]["nonfinite_run"] == 2
    assert all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point())
