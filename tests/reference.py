"""Test-side references: the published R2Gen code paths the fast ones are checked against."""

from __future__ import annotations

import torch

from r2gen.model.transformer import RelationalMemory


def published_relational_memory(rm: RelationalMemory, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """zhjohnchan/R2Gen's RelationalMemory.forward, step by step: [memory; token] projected every step."""
    outputs = []
    for i in range(inputs.shape[1]):
        memory = memory.reshape(-1, rm.num_slots, rm.d_model)
        token = inputs[:, i]
        kv = torch.cat([memory, token.unsqueeze(1)], 1)
        next_memory = memory + rm.attn(memory, kv, kv)
        next_memory = next_memory + rm.mlp(next_memory)
        gates = rm.W(token.unsqueeze(1)) + rm.U(torch.tanh(memory))
        input_gate, forget_gate = torch.split(gates, rm.d_model, dim=2)
        next_memory = torch.sigmoid(input_gate) * torch.tanh(next_memory) + torch.sigmoid(forget_gate) * memory
        memory = next_memory.reshape(-1, rm.num_slots * rm.d_model)
        outputs.append(memory)
    return torch.stack(outputs, dim=1)
