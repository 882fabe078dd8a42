"""The memory-driven Transformer of R2Gen (Chen et al. 2020), module for module.

Faithful to the published implementation (zhjohnchan/R2Gen, modules/encoder_decoder.py): the same
modules, shapes, parameter layout and initialisation, so the parameter count and behaviour match.
Three deliberate differences, all numerically neutral in fp32 (up to the order of sums):
- attention masks are filled with the dtype's most negative value instead of -1e9, which
  overflows in fp16 (softmax gives exactly the same probabilities in fp32);
- the published lambda-chained helpers are plain methods;
- the relational memory projects every token once before its loop over tokens, and the memory's
  query/key/value in one product per step (RelationalMemory.forward; the published step is kept,
  token by token, in tests/reference.py).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None = None, dropout: nn.Module | None = None) -> torch.Tensor:
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, torch.finfo(scores.dtype).min)
    p_attn = F.softmax(scores, dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value)


def subsequent_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, size, size) boolean mask, True where position j <= i may be attended."""
    return torch.ones(1, size, size, dtype=torch.bool, device=device).tril()


class LayerNorm(nn.Module):
    """R2Gen's LayerNorm: unbiased std and eps outside the square root (not nn.LayerNorm)."""

    def __init__(self, features: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.gamma * (x - mean) / (std + self.eps) + self.beta


class ConditionalLayerNorm(nn.Module):
    """Memory-driven Conditional LayerNorm: gamma and beta shifted by MLPs of the memory state."""

    def __init__(self, d_model: int, rm_num_slots: int, rm_d_model: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d_model))
        self.beta = nn.Parameter(torch.zeros(d_model))
        self.rm_d_model = rm_d_model
        self.rm_num_slots = rm_num_slots
        self.eps = eps
        # The published second gamma layer is Linear(rm_d_model, rm_d_model); kept for parity.
        self.mlp_gamma = nn.Sequential(nn.Linear(rm_num_slots * rm_d_model, d_model),
                                       nn.ReLU(inplace=True),
                                       nn.Linear(rm_d_model, rm_d_model))
        self.mlp_beta = nn.Sequential(nn.Linear(rm_num_slots * rm_d_model, d_model),
                                      nn.ReLU(inplace=True),
                                      nn.Linear(d_model, d_model))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        gamma_hat = self.gamma + self.mlp_gamma(memory)
        beta_hat = self.beta + self.mlp_beta(memory)
        return gamma_hat * (x - mean) / (std + self.eps) + beta_hat


class SublayerConnection(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.norm = LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        return x + self.dropout(sublayer(self.norm(x)))


class ConditionalSublayerConnection(nn.Module):
    def __init__(self, d_model: int, dropout: float, rm_num_slots: int, rm_d_model: int):
        super().__init__()
        self.norm = ConditionalLayerNorm(d_model, rm_num_slots, rm_d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, sublayer, memory: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(sublayer(self.norm(x, memory)))


class MultiHeadedAttention(nn.Module):
    def __init__(self, h: int, d_model: int, dropout: float = 0.1):
        super().__init__()
        assert d_model % h == 0, "d_model must be divisible by the number of heads"
        self.d_k = d_model // h
        self.h = h
        self.linears = clones(nn.Linear(d_model, d_model), 4)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            mask = mask.unsqueeze(1)
        nbatches = query.size(0)
        query, key, value = [lin(x).view(nbatches, -1, self.h, self.d_k).transpose(1, 2)
                             for lin, x in zip(self.linears, (query, key, value))]
        x = attention(query, key, value, mask=mask, dropout=self.dropout)
        x = x.transpose(1, 2).contiguous().view(nbatches, -1, self.h * self.d_k)
        return self.linears[-1](x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class Embeddings(nn.Module):
    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.lut = nn.Embedding(vocab, d_model)
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lut(x) * math.sqrt(self.d_model)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float, max_len: int = 5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len).unsqueeze(1).float()
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, :x.size(1)])


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: nn.Module, feed_forward: nn.Module, dropout: float):
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(SublayerConnection(d_model, dropout), 2)
        self.d_model = d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, mask))
        return self.sublayer[1](x, self.feed_forward)


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, n: int):
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, self_attn: nn.Module, src_attn: nn.Module, feed_forward: nn.Module,
                 dropout: float, rm_num_slots: int, rm_d_model: int):
        super().__init__()
        self.d_model = d_model
        self.self_attn = self_attn
        self.src_attn = src_attn
        self.feed_forward = feed_forward
        self.sublayer = clones(ConditionalSublayerConnection(d_model, dropout, rm_num_slots, rm_d_model), 3)

    def forward(self, x: torch.Tensor, hidden_states: torch.Tensor, src_mask: torch.Tensor,
                tgt_mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        m = hidden_states
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask), memory)
        x = self.sublayer[1](x, lambda y: self.src_attn(y, m, m, src_mask), memory)
        return self.sublayer[2](x, self.feed_forward, memory)


class Decoder(nn.Module):
    def __init__(self, layer: DecoderLayer, n: int):
        super().__init__()
        self.layers = clones(layer, n)
        self.norm = LayerNorm(layer.d_model)

    def forward(self, x: torch.Tensor, hidden_states: torch.Tensor, src_mask: torch.Tensor,
                tgt_mask: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, hidden_states, src_mask, tgt_mask, memory)
        return self.norm(x)


class RelationalMemory(nn.Module):
    """Relational memory: a few slots updated per token by attention over [memory; token], gated."""

    def __init__(self, num_slots: int, d_model: int, num_heads: int = 1):
        super().__init__()
        self.num_slots = num_slots
        self.num_heads = num_heads
        self.d_model = d_model
        self.attn = MultiHeadedAttention(num_heads, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(),
                                 nn.Linear(d_model, d_model), nn.ReLU())
        self.W = nn.Linear(d_model, d_model * 2)
        self.U = nn.Linear(d_model, d_model * 2)

    def init_memory(self, batch_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Identity rows padded with zeros: (batch, slots, d_model), made on like's device in its dtype
        (no host-to-device copy: a CUDA graph cannot capture one)."""
        kind = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        memory = torch.eye(self.num_slots, **kind).unsqueeze(0).expand(batch_size, -1, -1)
        if self.d_model > self.num_slots:
            pad = torch.zeros(batch_size, self.num_slots, self.d_model - self.num_slots, **kind)
            memory = torch.cat([memory, pad], -1)
        elif self.d_model < self.num_slots:
            memory = memory[:, :, :self.d_model]
        return memory

    def forward_step(self, token: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """One token (B, d): the memory (B, slots * d) after it (incremental decoding's step)."""
        attn = self.attn
        memory = memory.reshape(-1, self.num_slots, self.d_model)
        next_memory = self._step(memory, attn.linears[1](token), attn.linears[2](token), self.W(token),
                                 *self._qkv_weights())
        return next_memory.reshape(-1, self.num_slots * self.d_model)

    def forward(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """inputs (B, T, d) -> memory states after each token, (B, T, slots * d).

        The published step projects [memory; token] for keys and values and the token for the input
        and forget gates at every step; the token's share depends on the token alone, so it is
        projected for all T steps in one product before the loop, and the memory's query, key and
        value in one product per step (the same arithmetic, a third of the step's matrix products).
        """
        attn = self.attn
        memory = memory.reshape(-1, self.num_slots, self.d_model)
        # unbind, not [:, i]: one backward node for all steps instead of a zero-filled (B, T, d) each.
        tokens = zip(*(proj(inputs).unbind(1) for proj in (attn.linears[1], attn.linears[2], self.W)))
        weight, bias = self._qkv_weights()
        outputs = []
        for key, value, gates in tokens:
            memory = self._step(memory, key, value, gates, weight, bias)
            outputs.append(memory.reshape(-1, self.num_slots * self.d_model))
        return torch.stack(outputs, dim=1)

    def _qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's query, key and value projections stacked: one product for all three."""
        linears = self.attn.linears[:3]
        return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])

    def _step(self, memory: torch.Tensor, token_key: torch.Tensor, token_value: torch.Tensor,
              token_gates: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor) -> torch.Tensor:
        """The published forward_step on memory (B, slots, d), given the token's key, value and gate
        projections (B, d), (B, d), (B, 2d)."""
        attn, batch = self.attn, memory.size(0)
        query, key, value = F.linear(memory, qkv_weight, qkv_bias).split(self.d_model, dim=-1)
        key = torch.cat([key, token_key.unsqueeze(1)], 1)          # attends over [memory; token]
        value = torch.cat([value, token_value.unsqueeze(1)], 1)
        query, key, value = (x.view(batch, -1, attn.h, attn.d_k).transpose(1, 2) for x in (query, key, value))
        x = attention(query, key, value, dropout=attn.dropout)
        next_memory = memory + attn.linears[-1](x.transpose(1, 2).contiguous().view(batch, -1, attn.h * attn.d_k))
        next_memory = next_memory + self.mlp(next_memory)
        gates = token_gates.unsqueeze(1) + self.U(torch.tanh(memory))
        input_gate, forget_gate = torch.split(gates, self.d_model, dim=2)
        return torch.sigmoid(input_gate) * torch.tanh(next_memory) + torch.sigmoid(forget_gate) * memory


class Transformer(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, tgt_embed: nn.Module, rm: RelationalMemory):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.tgt_embed = tgt_embed
        self.rm = rm

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor,
                tgt_mask: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask, memory)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        # The published src_embed is the identity (features are embedded by att_embed before).
        return self.encoder(src, src_mask)

    def memory_states(self, tgt: torch.Tensor) -> torch.Tensor:
        """The relational memory after each target token, (B, T, slots * d): it reads the targets alone."""
        embedded = self.tgt_embed(tgt)
        # The initial memory in the embedding's dtype: the encoder output's, which the published code takes.
        return self.rm(embedded, self.rm.init_memory(tgt.size(0), embedded))

    def decode(self, hidden_states: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor,
               tgt_mask: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """memory: memory_states(tgt) if already computed. tgt_embed is applied twice, as published: the
        memory and the decoder see independent dropout masks of the same embedding."""
        if memory is None:
            memory = self.memory_states(tgt)
        return self.decoder(self.tgt_embed(tgt), hidden_states, src_mask, tgt_mask, memory)


def make_transformer(vocab_size: int, d_model: int, d_ff: int, num_heads: int, num_layers: int,
                     dropout: float, rm_num_slots: int, rm_num_heads: int, rm_d_model: int) -> Transformer:
    """Build and initialise the encoder-decoder exactly as R2Gen's EncoderDecoder.make_model."""
    c = copy.deepcopy
    attn = MultiHeadedAttention(num_heads, d_model)
    ff = PositionwiseFeedForward(d_model, d_ff, dropout)
    position = PositionalEncoding(d_model, dropout)
    rm = RelationalMemory(num_slots=rm_num_slots, d_model=rm_d_model, num_heads=rm_num_heads)
    model = Transformer(
        Encoder(EncoderLayer(d_model, c(attn), c(ff), dropout), num_layers),
        Decoder(DecoderLayer(d_model, c(attn), c(attn), c(ff), dropout, rm_num_slots, rm_d_model), num_layers),
        nn.Sequential(Embeddings(d_model, vocab_size), c(position)),
        rm)
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    return model
