"""The R2Gen model: parameter count, shapes, loss, and generation behaviour."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from r2gen.config import preset
from r2gen.model.r2gen import ModelConfig, R2GenModel, masked_nll
from r2gen.model.generation import beam_search, generate, greedy
from r2gen.model.transformer import ConditionalLayerNorm, LayerNorm, RelationalMemory, subsequent_mask
from reference import published_relational_memory


def test_parameter_count_matches_published_resnet101_model():
    # The published R2Gen with a 55-token vocabulary (54 words + <unk>) has exactly this many.
    model = R2GenModel(ModelConfig(), vocab_size=55)
    assert sum(p.numel() for p in model.parameters()) == 77_750_904


def test_parameter_names_follow_published_layout():
    names = set(dict(R2GenModel(preset("tiny").model, 20).named_parameters()))
    assert "visual_extractor.model.0.weight" in names
    assert "encoder_decoder.att_embed.0.weight" in names
    assert "encoder_decoder.model.rm.W.weight" in names
    assert "encoder_decoder.model.decoder.layers.0.sublayer.2.norm.mlp_gamma.2.weight" in names
    assert "encoder_decoder.logit.weight" in names


def test_layer_norm_uses_unbiased_std_and_eps_outside_sqrt():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ln = LayerNorm(4, eps=0.5)
    std = torch.tensor(1.2909944487358056)  # sqrt(5/3): unbiased
    expected = (x - 2.5) / (std + 0.5)
    torch.testing.assert_close(ln(x), expected)


def test_conditional_layer_norm_shifts_depend_on_memory():
    torch.manual_seed(0)
    cln = ConditionalLayerNorm(8, rm_num_slots=3, rm_d_model=8)
    x = torch.randn(2, 5, 8)
    m1, m2 = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    assert not torch.allclose(cln(x, m1), cln(x, m2))
    # The published bias initialisation is 0.1 for every Linear inside.
    assert torch.all(cln.mlp_beta[0].bias == 0.1)


def test_relational_memory_initial_state_and_output_shape():
    rm = RelationalMemory(num_slots=3, d_model=8, num_heads=2)
    mem = rm.init_memory(2)
    assert mem.shape == (2, 3, 8)
    torch.testing.assert_close(mem[0, :, :3], torch.eye(3))
    assert torch.all(mem[:, :, 3:] == 0)
    out = rm(torch.randn(2, 7, 8), mem)
    assert out.shape == (2, 7, 24)


@pytest.mark.parametrize("train", [True, False])
def test_relational_memory_computes_the_published_recurrence(train: bool):
    """Projections hoisted out of the token loop: the same outputs and gradients (float64), and in
    training the same dropout masks (the same random draws in the same order)."""
    torch.manual_seed(0)
    rm = RelationalMemory(num_slots=3, d_model=16, num_heads=4).double().train(train)
    inputs = torch.randn(5, 9, 16, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (rm.forward, lambda x, m: published_relational_memory(rm, x, m)):
        torch.manual_seed(1)
        out = run(inputs, rm.init_memory(5).double())
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out).double()).sum(),
                                    [inputs, *rm.parameters()])
        results.append((out, grads))
    (fast, fast_grads), (published, published_grads) = results
    # float64 (2^-53 = 1.1e-16 per operation), values of order 1 through 9 recurrent steps: ~1e-15 apart.
    torch.testing.assert_close(fast, published, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_grads, published_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # the incremental step is one step of the loop
        rm.eval()
        memory = rm.init_memory(5).double()
        torch.testing.assert_close(rm.forward_step(inputs[:, 0], memory), rm(inputs[:, :1], memory)[:, 0])


def test_subsequent_mask_is_lower_triangular():
    mask = subsequent_mask(3)
    assert mask.tolist() == [[[True, False, False], [True, True, False], [True, True, True]]]


@pytest.fixture(scope="module")
def tiny_model() -> R2GenModel:
    torch.manual_seed(0)
    return R2GenModel(dataclasses.replace(preset("tiny").model, max_seq_length=12), vocab_size=30).eval()


def test_forward_shapes_and_loss(tiny_model):
    images = torch.randn(3, 2, 3, 64, 64)
    targets = torch.tensor([[0, 5, 6, 7, 0, 0], [0, 8, 9, 0, 0, 0], [0, 1, 2, 3, 4, 0]])
    masks = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    logprobs = tiny_model(images, targets)
    assert logprobs.shape == (3, 5, 31)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(3, 5))
    loss = masked_nll(logprobs, targets, masks)
    manual = -sum(logprobs[b, t, targets[b, t + 1]] for b in range(3) for t in range(5) if masks[b, t + 1]) / 12  # 4 + 3 + 5 tokens
    torch.testing.assert_close(loss, manual)


def test_wrong_number_of_views_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\)"):
        tiny_model(torch.randn(2, 1, 3, 64, 64), torch.zeros(2, 4, dtype=torch.long))


def test_beam_size_one_equals_greedy(tiny_model):
    torch.manual_seed(1)
    images = torch.randn(5, 2, 3, 64, 64)
    with torch.no_grad():
        g = greedy(tiny_model, images, block_trigrams=False)
        b = beam_search(tiny_model, images, beam_size=1)
    assert g.shape == (5, 12)
    assert torch.equal(g, b)


def test_generate_routes_beam_one_to_greedy_with_trigram_blocking(tiny_model):
    images = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(generate(tiny_model, images, beam_size=1), greedy(tiny_model, images, True))


def test_generation_is_padded_after_end_token(tiny_model):
    torch.manual_seed(2)
    with torch.no_grad():
        seq = generate(tiny_model, torch.randn(4, 2, 3, 64, 64), beam_size=3)
    for row in seq.tolist():
        if 0 in row:
            first = row.index(0)
            assert all(t == 0 for t in row[first:])


def test_trigram_blocking_penalises_repeats():
    from r2gen.model.generation import TRIGRAM_PENALTY, _trigram_penalty

    seq = torch.tensor([[4, 5, 6, 4, 5, 0]])
    trigrams: list[dict] = [{}]
    # Steps 3, 4, 5 record (4,5)->6, (5,6)->4, (6,4)->5; at t=5 the prefix ends "4 5", so 6 is penalised.
    for t in (3, 4):
        _trigram_penalty(seq, t, trigrams, 8)
    penalty = _trigram_penalty(seq, 5, trigrams, 8)
    assert penalty[0, 6] == pytest.approx(TRIGRAM_PENALTY)
    assert penalty.count_nonzero() == 1
