"""Incremental decoding of the memory-driven decoder: one new token per step, nothing recomputed.

The published generator decodes the whole prefix again at every step (O(T^2) work, and the
relational memory re-run from its first token each time). Here each step embeds only the new
token, advances the relational memory by one token, and runs the decoder layers for that one
position against cached keys and values of the earlier positions (self-attention) and of the
encoder output (source attention). Under a causal mask a position never sees later ones, so this is
the same function as the published step: `tests/test_generation.py` checks token-for-token
identical reports on fixed weights.

The model's modules are used as they are (no copied weights): this file only orders their calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r2gen.model.r2gen import R2GenModel
from r2gen.model.transformer import MultiHeadedAttention, attention


def _heads(attn: MultiHeadedAttention, index: int, x: torch.Tensor) -> torch.Tensor:
    """The index-th input projection of attn, split into heads: (N, t, d) -> (N, h, t, d_k)."""
    return attn.linears[index](x).view(x.size(0), -1, attn.h, attn.d_k).transpose(1, 2)


def _merge(attn: MultiHeadedAttention, x: torch.Tensor) -> torch.Tensor:
    """Heads back to one vector per position, then the output projection."""
    return attn.linears[-1](x.transpose(1, 2).contiguous().view(x.size(0), -1, attn.h * attn.d_k))


@dataclass
class DecoderState:
    """Everything the next step needs, one row per prefix (a study, or a beam of one)."""

    model: R2GenModel
    src_keys: list[torch.Tensor]       # per decoder layer: (N, h, L, d_k) of the encoder output
    src_values: list[torch.Tensor]
    src_mask: torch.Tensor             # (N, 1, 1, L), as MultiHeadedAttention unsqueezes it
    keys: list[torch.Tensor]           # per decoder layer: (N, h, t, d_k) of the t positions decoded so far
    values: list[torch.Tensor]
    rm_memory: torch.Tensor            # (N, slots, d): the relational memory after the last token
    position: int = 0

    @classmethod
    def start(cls, model: R2GenModel, memory: torch.Tensor, src_mask: torch.Tensor) -> "DecoderState":
        """The state before the first token, from prepare_generation's (memory, src_mask)."""
        transformer = model.encoder_decoder.model
        layers = transformer.decoder.layers
        return cls(model=model,
                   src_keys=[_heads(layer.src_attn, 1, memory) for layer in layers],
                   src_values=[_heads(layer.src_attn, 2, memory) for layer in layers],
                   src_mask=src_mask.unsqueeze(1),
                   keys=[], values=[],  # filled by the first step, in the projections' dtype (autocast)
                   rm_memory=transformer.rm.init_memory(memory.size(0), memory))

    def select(self, rows: torch.Tensor, source: bool = True) -> "DecoderState":
        """The state of the prefixes `rows` (beam search's reordering; repeated rows are copies).

        source=False keeps the encoder-side tensors as they are: right when every row is picked
        from a row of the same study (a beam reordering within its study), whose are equal.
        """
        pick = lambda xs: [x.index_select(0, rows) for x in xs]  # noqa: E731
        src_keys, src_values, src_mask = ((pick(self.src_keys), pick(self.src_values),
                                           self.src_mask.index_select(0, rows)) if source else
                                          (self.src_keys, self.src_values, self.src_mask))
        return DecoderState(self.model, src_keys, src_values, src_mask, pick(self.keys), pick(self.values),
                            self.rm_memory.index_select(0, rows), self.position)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (N,); returns the next token's log-probabilities (N, V) and
        advances the state by one position (as model.step_logprobs on the whole prefix)."""
        transformer = self.model.encoder_decoder.model
        embed, positional = transformer.tgt_embed[0], transformer.tgt_embed[1]
        t = self.position
        # tgt_embed (Embeddings, then PositionalEncoding; its dropout is off in eval) at position t.
        x = positional.dropout(embed(tokens.unsqueeze(1)) + positional.pe[:, t:t + 1])
        self.rm_memory = transformer.rm.forward_step(x[:, 0], self.rm_memory).view_as(self.rm_memory)
        memory = self.rm_memory.reshape(x.size(0), 1, -1)  # (N, 1, slots * d): the conditional norms' input
        for i, layer in enumerate(transformer.decoder.layers):
            norm0, norm1, norm2 = (sub.norm for sub in layer.sublayer)
            y = norm0(x, memory)
            key, value = _heads(layer.self_attn, 1, y), _heads(layer.self_attn, 2, y)
            if t == 0:
                self.keys.append(key)
                self.values.append(value)
            else:
                self.keys[i] = torch.cat([self.keys[i], key], 2)
                self.values[i] = torch.cat([self.values[i], value], 2)
            # The newest position may attend to every position so far: no mask is needed.
            x = x + layer.sublayer[0].dropout(
                _merge(layer.self_attn, attention(_heads(layer.self_attn, 0, y), self.keys[i], self.values[i],
                                                  dropout=layer.self_attn.dropout)))
            y = norm1(x, memory)
            x = x + layer.sublayer[1].dropout(
                _merge(layer.src_attn, attention(_heads(layer.src_attn, 0, y), self.src_keys[i], self.src_values[i],
                                                 mask=self.src_mask, dropout=layer.src_attn.dropout)))
            x = x + layer.sublayer[2].dropout(layer.feed_forward(norm2(x, memory)))
        out = transformer.decoder.norm(x)
        self.position = t + 1
        return F.log_softmax(self.model.encoder_decoder.logit(out[:, -1]), dim=-1)
