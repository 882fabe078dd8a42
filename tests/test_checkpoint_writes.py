"""Checkpoints written in the background: the state is the one of the moment it was handed over (a
snapshot in host memory, whatever training does next), writes land in order, and a write's error is
raised in the loop."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from backends.plain import PlainBackend
from r2gen.build import prepare, prepare_model
from r2gen.checkpoint import BackgroundWrites, LoopCheckpoints, host_copy, load_checkpoint
from r2gen.config import preset
from r2gen.data.datasets import load_annotation
from r2gen.errors import RunFailed
from r2gen.state import LoopState


def test_host_copy_shares_no_tensor_and_keeps_every_value() -> None:
    weight = torch.randn(3, 4)
    state = {"model": {"w": weight}, "groups": [{"lr": 0.1, "params": [0, 1]}], "pair": (torch.ones(2), "x")}
    copy = host_copy(state)
    assert copy["model"]["w"].data_ptr() != weight.data_ptr() and torch.equal(copy["model"]["w"], weight)
    assert copy["groups"] == state["groups"] and isinstance(copy["pair"], tuple) and copy["pair"][1] == "x"
    weight.add_(1.0)  # training goes on
    assert not torch.equal(copy["model"]["w"], weight)


def test_writes_land_in_order_and_an_error_is_raised_at_the_next_wait() -> None:
    writes, seen = BackgroundWrites(), []
    for i in range(5):
        writes.submit(seen.append, i)
    writes.wait()
    assert seen == [0, 1, 2, 3, 4]

    def full_disk() -> None:
        raise RunFailed("disk full: writing step-00000002.pt")

    writes.submit(full_disk)
    with pytest.raises(RunFailed, match="disk full"):
        writes.wait()
    writes.submit(full_disk)
    with pytest.raises(RunFailed, match="disk full"):
        writes.close()  # the thread is stopped even so
    writes.close()


def test_at_most_max_pending_snapshots_are_held() -> None:
    writes, release = BackgroundWrites(max_pending=2), threading.Event()
    writes.submit(release.wait)
    writes.submit(lambda: None)  # queued behind the blocked one: 2 held
    third = threading.Thread(target=writes.submit, args=(lambda: None,))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive()  # waits for the oldest to finish
    release.set()
    third.join(timeout=30)
    assert not third.is_alive()
    writes.close()


def test_best_pt_holds_the_weights_of_the_moment_it_was_saved(small_set: Path, tmp_path: Path) -> None:
    cfg = preset("tiny").replace(image_size=32, window_size=4, num_workers=0)
    prep = prepare(cfg, PlainBackend("cpu"), load_annotation(small_set), None)
    model, optimizer = prepare_model(prep.backend, prep.model, cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    checkpoints = LoopCheckpoints(tmp_path, prep.backend, model, optimizer, scheduler, cfg, prep.tokenizer, None)
    (tmp_path / "checkpoints").mkdir()
    checkpoints.writes, release = BackgroundWrites(max_pending=3), threading.Event()  # the blocker and two states
    with checkpoints.writing(last=True):
        checkpoints.writes.submit(release.wait)  # the writer is busy: best.pt waits behind it
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        best = checkpoints.save_best(LoopState(), epoch=1)
        state = checkpoints.save(LoopState(steps=7), background=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the next steps change the weights before anything is written
        assert not best.exists()
        release.set()
    saved = load_checkpoint(best)["model"]
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    resumable = load_checkpoint(state)
    assert all(torch.equal(resumable["model"][k], expected[k]) for k in expected) and resumable["step"] == 7
    assert [e["step"] for e in checkpoints.store.manifest()["states"]] == [7]
