"""The fast generators against the published-code reference: the same reports, token for token.

The reference (`greedy`, `beam_search`) re-decodes the whole prefix at every step and keeps the
finished hypotheses in Python lists, as R2Gen does; the fast ones decode incrementally, batch every
beam and stop early. Fixed random weights, with the end token's logit shifted so that reports end
at many different lengths (the early stop and the finished-hypothesis bookkeeping are exercised).

In float64 (the bf16 test aside): the two decoders sum in other orders, which in fp32 leaves their
log-probabilities ~1e-6 apart, so a near-tie between two tokens could go either way depending on the
CPU's kernels; in float64 they are ~1e-15 apart, and equal reports are a property of the code.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from r2gen.config import preset
from r2gen.model.decoding import DecoderState
from r2gen.model.r2gen import R2GenModel
from r2gen.model.generation import (_trigram_penalty, beam_search, fast_beam_search, fast_greedy, generate,
                                  greedy, trigram_penalty)


def _model(eos_shift: float, max_len: int = 24, seed: int = 0, dtype: torch.dtype = torch.float64) -> R2GenModel:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("tiny").model, max_seq_length=max_len)
    model = R2GenModel(cfg, vocab_size=12).eval().to(dtype)
    with torch.no_grad():
        model.encoder_decoder.logit.bias[0] += eos_shift
        model.encoder_decoder.logit.weight.mul_(4.0)  # peakier distributions: repeated trigrams occur
    return model


def _images(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("eos_shift", [-2.0, -1.0, 0.0])
@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_fast_beam_search_gives_the_reference_reports(eos_shift: float, beam_size: int) -> None:
    model = _model(eos_shift)
    images = _images(10, seed=1)
    with torch.no_grad():
        reference = beam_search(model, images, beam_size)
        memory, src_mask = model.prepare_generation(images)
        fast = fast_beam_search(model, memory, src_mask, beam_size)
    assert torch.equal(fast, reference)
    lengths = {row.index(0) if 0 in row else len(row) for row in reference.tolist()}
    if (beam_size, eos_shift) == (3, -1.0):
        assert len(lengths) > 2  # reports of several lengths: the finished-hypothesis bookkeeping is used


@pytest.mark.parametrize("block_trigrams", [True, False])
@pytest.mark.parametrize("eos_shift", [-2.0, 1.0])
def test_fast_greedy_gives_the_reference_reports(block_trigrams: bool, eos_shift: float) -> None:
    model = _model(eos_shift, max_len=30)
    images = _images(12, seed=3)
    with torch.no_grad():
        reference = greedy(model, images, block_trigrams=block_trigrams)
        memory, src_mask = model.prepare_generation(images)
        fast = fast_greedy(model, memory, src_mask, block_trigrams=block_trigrams)
    assert torch.equal(fast, reference)


def test_trigram_blocking_changes_greedy_reports() -> None:
    # Guards the test above: with these weights, blocking really changes what greedy writes.
    model = _model(-2.0, max_len=30)
    with torch.no_grad():
        memory, src_mask = model.prepare_generation(_images(12, seed=3))
        assert not torch.equal(fast_greedy(model, memory, src_mask, True), fast_greedy(model, memory, src_mask, False))


def test_vectorised_trigram_penalty_equals_the_published_bookkeeping() -> None:
    torch.manual_seed(4)
    seq = torch.randint(0, 4, (20, 25))  # 4 tokens: many repeated trigrams
    trigrams: list[dict] = [{} for _ in range(20)]
    for t in range(3, 25):
        assert torch.equal(trigram_penalty(seq, t, 6), _trigram_penalty(seq, t, trigrams, 6))


def test_incremental_step_equals_decoding_the_whole_prefix() -> None:
    model = _model(0.0)
    with torch.no_grad():
        memory, src_mask = model.prepare_generation(_images(4, seed=5))
        state = DecoderState.start(model, memory, src_mask)
        ys = torch.zeros(4, 1, dtype=torch.long)
        for _ in range(10):
            fast = state.step(ys[:, -1])
            # float64, log-probabilities of order 10: other summation orders differ by ~1e-14 (2^-53 per operation).
            torch.testing.assert_close(fast, model.step_logprobs(ys, memory, src_mask), rtol=0, atol=1e-10)
            ys = torch.cat([ys, torch.randint(1, 13, (4, 1))], 1)


def test_generate_uses_the_fast_path_with_the_reference_result() -> None:
    model = _model(1.0)
    images = _images(6, seed=6)
    with torch.no_grad():
        assert torch.equal(generate(model, images, beam_size=3), beam_search(model, images, 3))
        assert torch.equal(generate(model, images, beam_size=1), greedy(model, images, True))
    with pytest.raises(ValueError, match="beam_size"):
        generate(model, images, beam_size=0)


def test_fast_generation_runs_under_bf16_autocast_with_the_reference_reports() -> None:
    """Under autocast the incremental step rounds differently (other matrix shapes): reports may
    then differ at a near-tie, which these weights do not have but for at most one study."""
    model = _model(-1.0, dtype=torch.float32)  # autocast leaves float64 alone
    images = _images(10, seed=1, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for beam_size, reference in ((3, beam_search(model, images, 3)), (1, greedy(model, images))):
            assert int((generate(model, images, beam_size=beam_size) == reference).all(1).sum()) >= 9


@pytest.mark.gpu
@pytest.mark.parametrize("beam_size", [1, 3])
def test_fast_generation_gives_the_reference_reports_on_a_gpu(beam_size: int) -> None:
    """fp32 on the GPU (TF32 off): the same reports as the reference, on the full-size decoder."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = R2GenModel(preset("iu_xray").model, vocab_size=60).cuda().eval()
        with torch.no_grad():
            model.encoder_decoder.logit.bias[0] -= 1.0  # reports of many lengths, as on the CPU
            images = torch.randn(16, 2, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            reference = beam_search(model, images, beam_size) if beam_size > 1 else greedy(model, images)
            assert torch.equal(generate(model, images, beam_size=beam_size), reference)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
