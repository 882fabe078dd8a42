"""Triton kernels of the fused relational memory (r2gen.fused_memory owns the loop and the autograd).

Rows are the memory's slots of every study (R = batch x slots), columns its d_model features. Per
token the forward runs five kernels (the memory's query/key/value and gate products, attention over
[memory; token], the output projection with its residual, the MLP's two layers with the gates) and
the backward six; every weight gradient is one product after the reverse sweep (r2gen.fused_memory).

Matrix products accumulate in fp32; their operands are fp32 (IEEE, no TF32: the plain path's fp32
products) or, under autocast, cast to bf16/fp16 as autocast casts a Linear's. Everything else is
fp32. The kernels run on a CPU under Triton's interpreter (TRITON_INTERPRET=1, set before this
module is imported), which is how CI tests them.
"""

from __future__ import annotations

import triton
import triton.language as tl

DOT_FP32, DOT_BF16, DOT_FP16 = 0, 1, 2
"""Operand precision of the products (a constexpr of every kernel with a product)."""


@triton.jit
def _tanh(x):
    """tanh to a few fp32 ulps (Cephes' tanhf): an odd polynomial below 0.625, exp above.
    (libdevice's tanh has no interpreter implementation; 2 sigmoid(2x) - 1 loses small values.)"""
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    e = tl.exp(2.0 * tl.abs(x))
    large = 1.0 - 2.0 / (e + 1.0)
    large = tl.where(x < 0, -large, large)
    return tl.where(tl.abs(x) < 0.625, small, large)


@triton.jit
def _mma(acc, a, w, DOT: tl.constexpr):
    if DOT == 1:
        return tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
    elif DOT == 2:
        return tl.dot(a.to(tl.float16), w.to(tl.float16), acc)
    else:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _product(acc, a_ptr, stride_am, w_ptr, stride_wn, stride_wk, offs_m, offs_n, M, N, K,
             BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """acc + A[offs_m, :K] @ W[offs_n, :K]^T; A's rows are contiguous, W's strides are given (so W
    or its transpose)."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        acc = _mma(acc, a, w, DOT)
    return acc


@triton.jit
def linear_kernel(a_ptr, w_ptr, bias_ptr, res_ptr, pos_ptr, out_ptr, M, N, K, n_split, a_shift,
                  stride_am, stride_wn, stride_wk, stride_rm, stride_pm, stride_om,
                  HAS_BIAS: tl.constexpr, RELU: tl.constexpr, POS: tl.constexpr, HAS_RES: tl.constexpr,
                  DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = A @ W^T [+ bias] [relu] [* (pos > 0)] [+ res]. Output columns from n_split on read A's
    columns a_shift further right (the first stage: [M | tanh M] times [W_qkv; U] in one launch);
    n_split is a multiple of BLOCK_N."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    shift = (pid_n * BLOCK_N >= n_split).to(tl.int32) * a_shift
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _product(acc, a_ptr + shift, stride_am, w_ptr, stride_wn, stride_wk, offs_m, offs_n, M, N, K,
                   BLOCK_K, DOT)
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if POS:
        pos = tl.load(pos_ptr + offs_m[:, None] * stride_pm + offs_n[None, :], mask=inside, other=0.0)
        acc = tl.where(pos > 0, acc, 0.0)
    if HAS_RES:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=inside, other=0.0)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=inside)


@triton.jit
def _gates(u_ptr, tg_ptr, rows, cols, inside, S, D, stride_u, stride_tg):
    """The gates' pre-activations [i | f] at (rows, cols): U tanh(M) + b_U (row by row) plus the token's
    gate input (one row per study, rows // S)."""
    study = rows // S
    gate_in = (tl.load(u_ptr + rows * stride_u + cols, mask=inside, other=0.0)
               + tl.load(tg_ptr + study * stride_tg + cols, mask=inside, other=0.0).to(tl.float32))
    gate_forget = (tl.load(u_ptr + rows * stride_u + D + cols, mask=inside, other=0.0)
                   + tl.load(tg_ptr + study * stride_tg + D + cols, mask=inside, other=0.0).to(tl.float32))
    return gate_in, gate_forget


@triton.jit
def gates_forward_kernel(h_ptr, w2_ptr, b2_ptr, m1_ptr, mt_ptr, u_ptr, tg_ptr, z_ptr, next_ptr,
                         R, D, S, stride_h, stride_m1, stride_mt, stride_u, stride_tg, stride_z, stride_next,
                         DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The MLP's second layer and the gates: Z = relu(H W2^T + b2), M2 = M1 + Z, and the next memory
    sigmoid(i) * tanh(M2) + sigmoid(f) * M with [i | f] = U tanh(M) + b_U + the token's gate input.
    Writes Z and [next | tanh(next)] (the next token's first-stage input)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _product(acc, h_ptr, stride_h, w2_ptr, D, 1, offs_m, offs_n, R, D, D, BLOCK_K, DOT)
    inside = (offs_m[:, None] < R) & (offs_n[None, :] < D)
    rows, cols = offs_m[:, None], offs_n[None, :]
    z = tl.maximum(acc + tl.load(b2_ptr + offs_n, mask=offs_n < D, other=0.0)[None, :], 0.0)
    m2 = tl.load(m1_ptr + rows * stride_m1 + cols, mask=inside, other=0.0) + z
    memory = tl.load(mt_ptr + rows * stride_mt + cols, mask=inside, other=0.0)
    gate_in, gate_forget = _gates(u_ptr, tg_ptr, rows, cols, inside, S, D, stride_u, stride_tg)
    nxt = tl.sigmoid(gate_in) * _tanh(m2) + tl.sigmoid(gate_forget) * memory
    tl.store(z_ptr + rows * stride_z + cols, z, mask=inside)
    tl.store(next_ptr + rows * stride_next + cols, nxt, mask=inside)
    tl.store(next_ptr + rows * stride_next + D + cols, _tanh(nxt), mask=inside)


@triton.jit
def _heads(qkvu_ptr, tok_ptr, b, h, S, DK, stride_qkvu, column,
           JP: tl.constexpr, DKP: tl.constexpr):
    """Keys or values of head h of study b over [memory; token]: rows j < S from the memory's
    projection (at `column`), row S the token's; (JP, DKP), zero-padded."""
    j = tl.arange(0, JP)
    d = tl.arange(0, DKP)
    on_d = d[None, :] < DK
    memory = tl.load(qkvu_ptr + (b * S + j[:, None]) * stride_qkvu + column + h * DK + d[None, :],
                     mask=(j[:, None] < S) & on_d, other=0.0)
    token = tl.load(tok_ptr + h * DK + d[None, :] + 0 * j[:, None], mask=(j[:, None] == S) & on_d, other=0.0)
    return memory + token.to(tl.float32)


@triton.jit
def _head_inputs(qkvu_ptr, tk_ptr, tv_ptr, S, D, DK, stride_qkvu, stride_tok,
                 SP: tl.constexpr, JP: tl.constexpr, DKP: tl.constexpr):
    """This program's study b and head h (of H), its index ranges (slots s, keys j, features d) and the
    head's queries (SP, DKP), keys and values (JP, DKP), zero-padded."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, DKP)
    q = tl.load(qkvu_ptr + (b * S + s[:, None]) * stride_qkvu + h * DK + d[None, :],
                mask=(s[:, None] < S) & (d[None, :] < DK), other=0.0)
    k = _heads(qkvu_ptr, tk_ptr + b * stride_tok, b, h, S, DK, stride_qkvu, D, JP, DKP)
    v = _heads(qkvu_ptr, tv_ptr + b * stride_tok, b, h, S, DK, stride_qkvu, 2 * D, JP, DKP)
    return b, h, tl.num_programs(1), s, tl.arange(0, JP), d, q, k, v


@triton.jit
def attention_forward_kernel(qkvu_ptr, tk_ptr, tv_ptr, drop_ptr, x_ptr, p_ptr, S, D, DK,
                             stride_qkvu, stride_tok, stride_x, sqrt_dk,
                             HAS_DROP: tl.constexpr, SP: tl.constexpr, JP: tl.constexpr, DKP: tl.constexpr):
    """One (study, head): softmax(q k^T / sqrt(d_k)) over the S memory slots and the token, dropout
    (a mask of 0 or 1/(1-p) per weight), times the values. Stores the heads' output X and the
    probabilities P (B, H, S, S+1) before dropout."""
    b, h, H, s, j, d, q, k, v = _head_inputs(qkvu_ptr, tk_ptr, tv_ptr, S, D, DK, stride_qkvu, stride_tok, SP, JP, DKP)
    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) / sqrt_dk
    scores = tl.where(j[None, :] <= S, scores, float("-inf"))
    e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    weights = (b * H + h) * S * (S + 1) + s[:, None] * (S + 1) + j[None, :]
    valid = (s[:, None] < S) & (j[None, :] <= S)
    kept = p
    if HAS_DROP:
        kept = p * tl.load(drop_ptr + weights, mask=valid, other=0.0)
    x = tl.sum(kept[:, :, None] * v[None, :, :], axis=1)
    tl.store(x_ptr + (b * S + s[:, None]) * stride_x + h * DK + d[None, :], x,
             mask=(s[:, None] < S) & (d[None, :] < DK))
    tl.store(p_ptr + weights, p, mask=valid)


@triton.jit
def attention_backward_kernel(qkvu_ptr, tk_ptr, tv_ptr, drop_ptr, p_ptr, dx_ptr, dqkv_ptr, dtk_ptr, dtv_ptr,
                              S, D, DK, stride_qkvu, stride_tok, stride_dx, stride_dqkv, stride_dtok, sqrt_dk,
                              HAS_DROP: tl.constexpr, SP: tl.constexpr, JP: tl.constexpr, DKP: tl.constexpr):
    """attention_forward_kernel's backward for one (study, head): the gradients of the memory's
    query, key and value (into dQKV) and of the token's key and value."""
    b, h, H, s, j, d, q, k, v = _head_inputs(qkvu_ptr, tk_ptr, tv_ptr, S, D, DK, stride_qkvu, stride_tok, SP, JP, DKP)
    on_s = (s[:, None] < S) & (d[None, :] < DK)
    weights = (b * H + h) * S * (S + 1) + s[:, None] * (S + 1) + j[None, :]
    valid = (s[:, None] < S) & (j[None, :] <= S)
    p = tl.load(p_ptr + weights, mask=valid, other=0.0)
    dx = tl.load(dx_ptr + (b * S + s[:, None]) * stride_dx + h * DK + d[None, :], mask=on_s, other=0.0)
    kept = p
    d_kept = tl.sum(dx[:, None, :] * v[None, :, :], axis=2)
    if HAS_DROP:
        mask = tl.load(drop_ptr + weights, mask=valid, other=0.0)
        kept = p * mask
        d_kept = d_kept * mask
    dv = tl.sum(kept[:, :, None] * dx[:, None, :], axis=0)
    d_scores = p * (d_kept - tl.sum(p * d_kept, axis=1)[:, None]) / sqrt_dk
    dq = tl.sum(d_scores[:, :, None] * k[None, :, :], axis=1)
    dk = tl.sum(d_scores[:, :, None] * q[:, None, :], axis=0)
    tl.store(dqkv_ptr + (b * S + s[:, None]) * stride_dqkv + h * DK + d[None, :], dq, mask=on_s)
    on_memory = (j[:, None] < S) & (d[None, :] < DK)
    memory_rows = dqkv_ptr + (b * S + j[:, None]) * stride_dqkv + h * DK + d[None, :]
    tl.store(memory_rows + D, dk, mask=on_memory)
    tl.store(memory_rows + 2 * D, dv, mask=on_memory)
    on_token = (j[:, None] == S) & (d[None, :] < DK)
    token = b * stride_dtok + h * DK + d[None, :] + 0 * j[:, None]
    tl.store(dtk_ptr + token, dk, mask=on_token)
    tl.store(dtv_ptr + token, dv, mask=on_token)


@triton.jit
def gates_backward_kernel(gout_ptr, carry_ptr, mt_ptr, u_ptr, tg_ptr, m1_ptr, z_ptr,
                          dgates_ptr, dm2_ptr, dz_ptr, direct_ptr, R, D, S,
                          stride_mt, stride_u, stride_tg, stride_dgates,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The gates' backward (elementwise) for one token, from g = dL/d(next memory): the gradients of
    the gate pre-activations [i | f], of M2, of the MLP's second layer before its ReLU (dZ), and the
    forget gate's direct share of dL/dM. Row-major (R, D) buffers have row stride D."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = offs_m[:, None], offs_n[None, :]
    inside = (rows < R) & (cols < D)
    flat = rows * D + cols
    g = tl.load(gout_ptr + flat, mask=inside, other=0.0) + tl.load(carry_ptr + flat, mask=inside, other=0.0)
    memory = tl.load(mt_ptr + rows * stride_mt + cols, mask=inside, other=0.0)
    gate_in, gate_forget = _gates(u_ptr, tg_ptr, rows, cols, inside, S, D, stride_u, stride_tg)
    z = tl.load(z_ptr + flat, mask=inside, other=0.0)
    m2 = tl.load(m1_ptr + flat, mask=inside, other=0.0) + z
    s_in = tl.sigmoid(gate_in)
    s_forget = tl.sigmoid(gate_forget)
    t2 = _tanh(m2)
    tl.store(dgates_ptr + rows * stride_dgates + cols, g * t2 * (1.0 - s_in) * s_in, mask=inside)
    tl.store(dgates_ptr + rows * stride_dgates + D + cols, g * memory * (1.0 - s_forget) * s_forget, mask=inside)
    dm2 = g * s_in * (1.0 - t2 * t2)
    tl.store(dm2_ptr + flat, dm2, mask=inside)
    tl.store(dz_ptr + flat, tl.where(z > 0, dm2, 0.0), mask=inside)
    tl.store(direct_ptr + flat, g * s_forget, mask=inside)


@triton.jit
def memory_grad_kernel(dqkv_ptr, wqkv_ptr, dgates_ptr, wu_ptr, mt_ptr, direct_ptr, dm1_ptr, out_ptr,
                       R, D, stride_dqkv, stride_dgates, stride_mt,
                       DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/dM of one token's input memory: the forget gate's share + the output projection's residual
    (dM1) + dQKV W_qkv + (dGates U) * (1 - tanh(M)^2)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    through_qkv = _product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dqkv_ptr, stride_dqkv,
                           wqkv_ptr, 1, D, offs_m, offs_n, R, D, 3 * D, BLOCK_K, DOT)
    through_u = _product(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dgates_ptr, stride_dgates,
                         wu_ptr, 1, D, offs_m, offs_n, R, D, 2 * D, BLOCK_K, DOT)
    rows, cols = offs_m[:, None], offs_n[None, :]
    inside = (rows < R) & (cols < D)
    flat = rows * D + cols
    tanh_m = tl.load(mt_ptr + rows * stride_mt + D + cols, mask=inside, other=0.0)
    grad = (tl.load(direct_ptr + flat, mask=inside, other=0.0) + tl.load(dm1_ptr + flat, mask=inside, other=0.0)
            + through_qkv + through_u * (1.0 - tanh_m * tanh_m))
    tl.store(out_ptr + flat, grad, mask=inside)
