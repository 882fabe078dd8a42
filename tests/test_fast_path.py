"""15 training steps of the fast path track the plain (published) path on the same seed.

Fast: uint8 batches normalized on the device and the relational memory with its projections
hoisted out of the token loop (the defaults). Plain: R2Gen's host transforms (float batches) and
the published step-by-step recurrence (tests/reference.py). Both are the same function, summed in
other orders. In fp32 that rounding noise (1e-7) is amplified by Adam, whose first updates are
about lr * sign(gradient): gradients that are zero in exact arithmetic (the attention key biases)
are pure noise there and get full-size steps, so the fp32 curves drift apart by amounts that depend
on the CPU (on a 2-core AMD EPYC 7e-4 at the third step, 1.4e-2 later; on another CPU 1e-7).

So both runs train in float64 (the images, normalized in fp32 as in training, enter the model
exactly): the rounding noise is then ~1e-16, far below Adam's eps (1e-8), which keeps those updates
negligible, and the two trajectories stay together on any machine. The logged loss is still summed
in fp32 (train_step), so every step's loss must agree to fp32 roundoff: 64 units (2^-24 each)
bound the fp32 sums of ~400 token NLLs whose float64 values agree (seen: 0, at one step 1.3 units). A wrong
gradient or normalization in the fast path changes the losses from the first or second step on by
far more. The gradients themselves are compared in float64 in tests/test_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from backends.plain import PlainBackend
from r2gen.build import prepare
from r2gen.config import preset
from r2gen.data.datasets import load_annotation
from r2gen.train import train
from reference import published_relational_memory

STEPS = 15  # float64 on a CPU: 15 steps (5 epochs) keep the test under a minute
FP32_LOSS_REL = 64 * 2.0**-24  # the logged loss is an fp32 sum; the float64 trajectories agree far below that


def _losses(small_set: Path, run: Path, fast: bool) -> list[float]:
    cfg = preset("tiny").replace(image_size=32, window_size=7, num_workers=0, log_every=1, val_every=0, beam_size=1,
                                 epochs=-(-STEPS // 3), uint8_images=fast,
                                 checkpoint_every_min=60.0)  # 21 train studies: 3 steps an epoch; one checkpoint, at the end
    prep = prepare(cfg, PlainBackend("cpu"), load_annotation(small_set), None)
    prep.model.double()  # before train() builds the optimizer: its state is float64 too
    extractor = prep.model.visual_extractor
    extractor.forward = lambda images, forward=extractor.forward: forward(images.double())
    if not fast:
        rm = prep.model.encoder_decoder.model.rm
        rm.forward = lambda inputs, memory: published_relational_memory(rm, inputs, memory)
    train(prep, run, Console(file=open("/dev/null", "w")))  # noqa: SIM115 - closed with the process
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r][:STEPS]


@pytest.mark.slow
def test_the_fast_path_tracks_the_plain_path_for_15_steps(small_set: Path, tmp_path: Path) -> None:
    fast, plain = _losses(small_set, tmp_path / "fast", True), _losses(small_set, tmp_path / "plain", False)
    assert len(fast) == len(plain) == STEPS
    for step in range(STEPS):
        assert fast[step] == pytest.approx(plain[step], rel=FP32_LOSS_REL), (step, fast[step], plain[step])
    # Both really trained: 0.58 in float64 (the same number on any machine, to far below the margin).
    assert sum(fast[-5:]) < 0.7 * sum(fast[:5])
