"""Report generation: greedy decoding and beam search, as R2Gen's AttModel/CaptionModel do them.

The published defaults are beam search with beam 3 (`--sample_method beam_search --beam_size 3`)
and `--block_trigrams 1`. In the published code trigram blocking lives in the greedy path
(`_sample`) only; its beam search never blocks trigrams. Both behaviours are kept here, so with the
defaults (beam 3) no trigram is blocked, exactly as in the original.

Two implementations of each: `greedy` and `beam_search` follow the published code step for step
(the whole prefix decoded again at every step, finished hypotheses collected per study in Python)
and are the reference; `fast_greedy` and `fast_beam_search`, which `generate` uses, decode
incrementally (r2gen.model.decoding) with every beam of every study in one batch and no per-study
Python, and stop once no hypothesis can change the answer. They give the same reports, token for
token (tests/test_generation.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r2gen.model.decoding import DecoderState
from r2gen.model.r2gen import R2GenModel

TRIGRAM_PENALTY = -0.693 * 2.0
"""Log-prob added per earlier occurrence of a trigram (ln(1/2) * alpha, alpha = 2, as published)."""

STOP_CHECK_EVERY = 4
"""Steps between the fast generators' checks whether they can stop (each check waits for the GPU)."""


def generate(model: R2GenModel, images: torch.Tensor, beam_size: int = 3,
             block_trigrams: bool = True) -> torch.Tensor:
    """Token ids (B, max_seq_length), 0-padded after the end token. Runs under no_grad."""
    with torch.no_grad():
        return generate_from_features(model, model.extract(images)[0], beam_size, block_trigrams)


def generate_from_features(model: R2GenModel, att_feats: torch.Tensor, beam_size: int = 3,
                           block_trigrams: bool = True) -> torch.Tensor:
    """generate() on the visual extractor's patch features (model.extract(images)[0]), so a caller
    that already ran the extractor (evaluation's teacher-forced loss) does not run it again."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    with torch.no_grad():
        memory, src_mask = model.encode_features(att_feats)
        if beam_size > 1:
            return fast_beam_search(model, memory, src_mask, beam_size)
        return fast_greedy(model, memory, src_mask, block_trigrams=block_trigrams)


def _repeat_rows(n: int, x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B*n, ...), each row repeated n times in place (R2Gen's utils.repeat_tensors)."""
    return x.unsqueeze(1).expand(-1, n, *x.shape[1:]).reshape(x.shape[0] * n, *x.shape[1:])


def _trigram_penalty(seq: torch.Tensor, t: int, trigrams: list[dict[tuple[int, int], list[int]]],
                     vocab: int) -> torch.Tensor:
    """Record the trigram completed at t-1 and penalise repeating any earlier trigram at step t."""
    rows = seq[:, t - 3:t].tolist()
    mask = torch.zeros(len(rows), vocab)
    for i, (a, b, c) in enumerate(rows):
        trigrams[i].setdefault((a, b), []).append(c)
        for j in trigrams[i].get((b, c), ()):
            mask[i, j] += 1
    return mask * TRIGRAM_PENALTY


def greedy(model: R2GenModel, images: torch.Tensor, block_trigrams: bool = True) -> torch.Tensor:
    """R2Gen's `_sample` with sample_method greedy: argmax each step, stop when all ended."""
    memory, src_mask = model.prepare_generation(images)
    batch, max_len, eos = images.size(0), model.max_seq_length, model.eos_idx
    seq = torch.full((batch, max_len), model.pad_idx, dtype=torch.long, device=memory.device)
    ys = torch.full((batch, 1), model.bos_idx, dtype=torch.long, device=memory.device)
    trigrams: list[dict[tuple[int, int], list[int]]] = [{} for _ in range(batch)]
    unfinished = torch.ones(batch, dtype=torch.bool, device=memory.device)
    for t in range(max_len):
        logprobs = model.step_logprobs(ys, memory, src_mask)
        if block_trigrams and t >= 3:
            logprobs = logprobs + _trigram_penalty(seq, t, trigrams, logprobs.size(1)).to(logprobs)
        _, it = torch.max(logprobs, 1)
        if t == 0:
            unfinished = it != eos
        else:
            it[~unfinished] = model.pad_idx
            unfinished = unfinished & (it != eos)
        seq[:, t] = it
        ys = torch.cat([ys, it.unsqueeze(1)], dim=1)
        if not unfinished.any():
            break
    return seq


def _select_beams(logprobs: torch.Tensor, beam_sum: torch.Tensor, t: int,
                  beam_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """R2Gen's beam_step: the beam_size best (beam, token) extensions of each study's beams.

    logprobs (rows, V) with one row per study at t = 0 and one per beam after; beam_sum (B, beam).
    Returns (the beam each extension continues (B, beam), its token (B, beam), its summed
    log-probability (B, beam), the logprobs row it continues, flat (B * beam,)).
    """
    batch, vocab = beam_sum.size(0), logprobs.size(-1)
    lp = logprobs.reshape(batch, -1, vocab)
    sums = beam_sum[:, :1] if t == 0 else beam_sum
    candidates = (sums.unsqueeze(-1) + lp).reshape(batch, -1)
    _, ix = torch.sort(candidates, -1, True)
    ix = ix[:, :beam_size]
    beam_ix, selected = ix // vocab, ix % vocab
    rows = (beam_ix + torch.arange(batch, device=ix.device).unsqueeze(-1) * lp.size(1)).reshape(-1)
    return beam_ix, selected, sums.gather(1, beam_ix) + lp.reshape(batch, -1).gather(1, ix), rows


def beam_search(model: R2GenModel, images: torch.Tensor, beam_size: int = 3) -> torch.Tensor:
    """R2Gen's `_sample_beam` + `beam_search` (one group, no length penalty), batched over studies.

    Ended beams stay in the beam with their score lowered by 1000, as published; the finished
    hypotheses are ranked by their summed log-probability and the best one is returned.
    """
    memory, src_mask = model.prepare_generation(images)
    batch, max_len, eos = images.size(0), model.max_seq_length, model.eos_idx
    device = memory.device
    ys = torch.full((batch, 1), model.bos_idx, dtype=torch.long, device=device)
    logprobs = model.step_logprobs(ys, memory, src_mask)
    memory, src_mask = _repeat_rows(beam_size, memory), _repeat_rows(beam_size, src_mask)
    vocab = logprobs.size(-1)
    if beam_size > vocab:
        raise ValueError(f"beam_size {beam_size} exceeds the vocabulary size {vocab}")

    beam_seq = torch.zeros(batch, beam_size, 0, dtype=torch.long, device=device)
    beam_sum = torch.zeros(batch, beam_size, device=device)
    done: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    for t in range(max_len):
        beam_ix, selected, beam_sum, state_ix = _select_beams(logprobs, beam_sum, t, beam_size)
        if t > 0:
            beam_seq = beam_seq.gather(1, beam_ix.unsqueeze(-1).expand_as(beam_seq))
        beam_seq = torch.cat([beam_seq, selected.unsqueeze(-1)], -1)
        ys = ys[state_ix]

        is_end = beam_seq[:, :, t] == eos
        if t == max_len - 1:
            is_end.fill_(True)
        if is_end.any():
            for b, v in is_end.nonzero().tolist():
                done[b].append((beam_sum[b, v].item(), beam_seq[b, v].tolist()))
            beam_sum = torch.where(is_end, beam_sum - 1000, beam_sum)
        if t == max_len - 1:
            break
        it = beam_seq[:, :, t].reshape(-1)
        ys = torch.cat([ys, it.unsqueeze(1)], dim=1)
        # The published loop applies log_softmax again to the step's log-probabilities.
        logprobs = F.log_softmax(model.step_logprobs(ys, memory, src_mask), dim=-1)

    seq = torch.full((batch, max_len), model.pad_idx, dtype=torch.long, device=device)
    for b in range(batch):
        best = sorted(done[b], key=lambda hyp: -hyp[0])[0][1]
        seq[b, :len(best)] = torch.tensor(best, dtype=torch.long, device=device)
    return seq


def trigram_penalty(seq: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    """The penalty _trigram_penalty gives at step t (t >= 3), for all rows at once, from seq alone:
    each earlier trigram (seq[s], seq[s+1], seq[s+2]), s <= t-3, whose first two tokens are the
    last two generated penalises its third token once per occurrence."""
    earlier = (seq[:, :t - 2] == seq[:, t - 2:t - 1]) & (seq[:, 1:t - 1] == seq[:, t - 1:t])
    counts = torch.zeros(seq.size(0), vocab, dtype=torch.float32, device=seq.device)
    counts.scatter_add_(1, seq[:, 2:t], earlier.float())
    return counts * TRIGRAM_PENALTY


def fast_greedy(model: R2GenModel, memory: torch.Tensor, src_mask: torch.Tensor,
                block_trigrams: bool = True) -> torch.Tensor:
    """greedy(), decoded incrementally from prepare_generation's (memory, src_mask)."""
    batch, max_len, eos = memory.size(0), model.max_seq_length, model.eos_idx
    state = DecoderState.start(model, memory, src_mask)
    seq = torch.full((batch, max_len), model.pad_idx, dtype=torch.long, device=memory.device)
    it = torch.full((batch,), model.bos_idx, dtype=torch.long, device=memory.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=memory.device)
    for t in range(max_len):
        logprobs = state.step(it)
        if block_trigrams and t >= 3:
            logprobs = logprobs + trigram_penalty(seq, t, logprobs.size(1)).to(logprobs)
        _, it = torch.max(logprobs, 1)
        if t == 0:
            unfinished = it != eos
        else:
            it = it.masked_fill(~unfinished, model.pad_idx)
            unfinished = unfinished & (it != eos)
        seq[:, t] = it
        # Steps after every row ended only write padding: checking now and then gives the same seq.
        if t % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and not unfinished.any():
            break
    return seq


def fast_beam_search(model: R2GenModel, memory: torch.Tensor, src_mask: torch.Tensor,
                     beam_size: int = 3) -> torch.Tensor:
    """beam_search(), with the finished hypotheses kept as tensors (the best per study so far).

    Ties go where the reference's stable sort of its finished list sends them: to the earlier step,
    then to the lower beam. The search stops early when, in every study, even the best live beam
    scores below the best finished hypothesis: log-probabilities are never positive, so no later
    hypothesis could overtake it.
    """
    batch, max_len, eos = memory.size(0), model.max_seq_length, model.eos_idx
    device = memory.device
    state = DecoderState.start(model, memory, src_mask)
    logprobs = state.step(torch.full((batch,), model.bos_idx, dtype=torch.long, device=device))
    vocab = logprobs.size(-1)
    if beam_size > vocab:
        raise ValueError(f"beam_size {beam_size} exceeds the vocabulary size {vocab}")

    beam_seq = torch.zeros(batch, beam_size, max_len, dtype=torch.long, device=device)
    beam_sum = torch.zeros(batch, beam_size, device=device)
    best_sum = torch.full((batch,), float("-inf"), device=device)
    best_seq = torch.full((batch, max_len), model.pad_idx, dtype=torch.long, device=device)
    found = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = torch.arange(max_len, device=device)
    for t in range(max_len):
        beam_ix, selected, beam_sum, rows = _select_beams(logprobs, beam_sum, t, beam_size)
        if t > 0:
            beam_seq = beam_seq.gather(1, beam_ix.unsqueeze(-1).expand_as(beam_seq))
        beam_seq[:, :, t] = selected

        is_end = torch.ones_like(selected, dtype=torch.bool) if t == max_len - 1 else selected == eos
        ended_sum, ended_beam = torch.where(is_end, beam_sum, float("-inf")).max(1)  # max: the first of equals
        better = is_end.any(1) & (~found | (ended_sum > best_sum))
        best_sum = torch.where(better, ended_sum, best_sum)
        chosen = beam_seq[torch.arange(batch, device=device), ended_beam].masked_fill(positions > t, model.pad_idx)
        best_seq = torch.where(better.unsqueeze(1), chosen, best_seq)
        found = found | better
        beam_sum = torch.where(is_end, beam_sum - 1000, beam_sum)
        if t == max_len - 1:
            break
        if t % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool((found & (beam_sum.max(1)[0] < best_sum)).all()):
            break
        # After the first step each study's beams share its encoder output: only the first selection
        # (one row per study -> beam_size rows) copies it.
        state = state.select(rows, source=t == 0)
        # The published loop applies log_softmax again to the step's log-probabilities.
        logprobs = F.log_softmax(state.step(selected.reshape(-1)), dim=-1)
    return best_seq
