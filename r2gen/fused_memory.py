"""The relational memory's token loop in a few fused kernels per token, with a hand-written backward.

R2Gen's relational memory (r2gen.model.transformer.RelationalMemory) updates a few slots per target
token; run as PyTorch operations, its 59-token loop launches ~8,000 tiny kernels per training step
(forward and autograd's backward), and the step waits on launches, not on the GPU. Here the same
arithmetic runs as five Triton kernels per token forward (r2gen.kernels.relational_memory) and six
backward; the backward carries only the memory's gradient through the reversed loop and computes
every weight gradient afterwards as one product over all tokens (as cuDNN's and FlashRNN's RNN
backwards do).

`FusedRelationalMemory.install(rm)` replaces one module's forward (an instance attribute: the
module's parameters and state_dict stay as they are) with `FusedRelationalMemory`, which runs the
kernels on a GPU (and on a CPU under TRITON_INTERPRET=1) and the module's own forward elsewhere,
saying why once. `install_fused_memory` (r2gen.speedups) installs it where the module fits. The dropout on
the attention weights (p = rm.attn.dropout.p, training only) draws its mask with torch's generator,
one tensor for all tokens, so it is captured by CUDA graphs like any other dropout.

The same function as the plain path: tests/test_fused_memory.py compares outputs and every gradient
on a CPU (the kernels under Triton's interpreter, fp32) and on a GPU (bf16).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn as nn

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
"""Tiles of the products: rows (R = batch x slots, 48 at batch 16) are few, so small tiles keep
more of the GPU's multiprocessors busy."""
ELEMENTWISE_BLOCK = (16, 64)


def _kernels() -> ModuleType | None:
    """The Triton kernels' module, or None where Triton is not installed."""
    try:
        from r2gen.kernels import relational_memory
    except ImportError:
        return None
    return relational_memory


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 in the environment when their
    module was first imported and while they run (tests on a CPU)."""
    kernels = _kernels()
    return kernels is not None and type(kernels.linear_kernel).__name__ == "InterpretedFunction"


def unfit_module(rm: nn.Module) -> str:
    """Why the kernels cannot serve this RelationalMemory at all ("" when they can)."""
    if _kernels() is None:
        return "Triton is not installed"
    if rm.d_model % BLOCK_N:
        return f"rm_d_model {rm.d_model} is not a multiple of {BLOCK_N}"
    linears = [*rm.attn.linears, rm.mlp[0], rm.mlp[2], rm.W, rm.U]
    if any(type(m) is not nn.Linear for m in linears):
        return "its Linear layers were swapped (FP8 engines run them in float8)"
    return ""


def unfit_input(inputs: torch.Tensor) -> str:
    """Why the kernels cannot run on these inputs ("" when they can)."""
    if inputs.is_cuda:
        if interpreted():
            return "TRITON_INTERPRET=1 runs Triton kernels on the CPU only"
        if torch.cuda.get_device_capability(inputs.device) < (7, 0):
            return "the GPU's compute capability is under 7.0"
    elif inputs.device.type != "cpu" or not interpreted():
        return f"the kernels run on a CUDA GPU (or a CPU under TRITON_INTERPRET=1), not on {inputs.device.type}"
    if inputs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"inputs of dtype {inputs.dtype}"
    return ""


def _dot(device_type: str) -> int:
    """The products' operand precision: autocast's, else fp32."""
    from r2gen.kernels.relational_memory import DOT_BF16, DOT_FP16, DOT_FP32

    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        return {torch.bfloat16: DOT_BF16, torch.float16: DOT_FP16}.get(torch.get_autocast_dtype("cuda"), DOT_FP32)
    return DOT_FP32


def _grid(rows: int, cols: int, block: tuple[int, int] = (BLOCK_M, BLOCK_N)) -> tuple[int, int]:
    return (-(-rows // block[0]), -(-cols // block[1]))


def _linear(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, dot: int, *, transpose: bool = True,
            bias: torch.Tensor | None = None, relu: bool = False, pos: torch.Tensor | None = None,
            res: torch.Tensor | None = None, n_split: int | None = None, a_shift: int = 0) -> None:
    """out = a @ w.T (transpose) or a @ w, then the epilogue (see linear_kernel). a, out, pos and res
    are (rows, cols) views with contiguous rows; w is contiguous."""
    rows, cols = out.shape
    inner = w.shape[1] if transpose else w.shape[0]
    stride_wn, stride_wk = (w.stride(0), 1) if transpose else (1, w.stride(0))
    # An absent operand's pointer is never read (its constexpr flag is off): `out` stands in.
    bias_, res_, pos_ = (t if t is not None else out for t in (bias, res, pos))
    _kernels().linear_kernel[_grid(rows, cols)](
        a, w, bias_, res_, pos_, out, rows, cols, inner, cols if n_split is None else n_split, a_shift,
        a.stride(0), stride_wn, stride_wk, res_.stride(0), pos_.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, RELU=relu, POS=pos is not None, HAS_RES=res is not None, DOT=dot,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _head_sizes(slots: int, dk: int) -> dict[str, int]:
    """The attention kernels' padded block sizes: slots, keys ([memory; token]) and head width."""
    return {"SP": _pow2(slots), "JP": _pow2(slots + 1), "DKP": _pow2(dk)}


class _Memory(torch.autograd.Function):
    """The token loop: inputs are the tokens' hoisted projections and the memory's weights."""

    @staticmethod
    def forward(ctx, token_key: torch.Tensor, token_value: torch.Tensor, token_gates: torch.Tensor,
                memory: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor,
                w_1: torch.Tensor, b_1: torch.Tensor, w_2: torch.Tensor, b_2: torch.Tensor, w_u: torch.Tensor,
                b_u: torch.Tensor, drop: torch.Tensor | None, heads: int) -> torch.Tensor:
        k = _kernels()
        batch, tokens, d = token_key.shape
        slots = memory.size(1)
        rows = batch * slots
        dot = _dot(token_key.device.type)
        f32 = {"device": token_key.device, "dtype": torch.float32}
        tk, tv, tg = (x.contiguous() for x in (token_key, token_value, token_gates))
        w_o, w_1, w_2 = (w.float().contiguous() for w in (w_o, w_1, w_2))
        w_first = torch.cat([w_qkv, w_u]).float().contiguous()  # one launch: [M | tanh M] x [W_qkv; U]
        b_first = torch.cat([b_qkv, b_u]).float().contiguous()
        # Per token t: mt[t] = [M_t | tanh M_t] (mt[t+1] is the loop's output), qkvu[t] = [q k v | U tanh M + b],
        # x[t] the heads' output, m1[t] = M + x W_o^T + b_o, hid[t] the MLP's hidden layer, z[t] its output.
        mt = torch.empty(tokens + 1, rows, 2 * d, **f32)
        start = memory.reshape(rows, d).float()
        mt[0, :, :d] = start
        mt[0, :, d:] = torch.tanh(start)
        qkvu = torch.empty(tokens, rows, 5 * d, **f32)
        x, m1, hid, z = (torch.empty(tokens, rows, d, **f32) for _ in range(4))
        probs = torch.empty(tokens, batch, heads, slots, slots + 1, **f32)
        dk = d // heads
        sqrt_dk = float(dk) ** 0.5
        sizes = _head_sizes(slots, dk)
        b_o, b_1, b_2 = (b.float().contiguous() for b in (b_o, b_1, b_2))
        for t in range(tokens):
            _linear(mt[t], w_first, qkvu[t], dot, bias=b_first, n_split=3 * d, a_shift=d)
            k.attention_forward_kernel[(batch, heads)](
                qkvu[t], tk[:, t], tv[:, t], drop[t] if drop is not None else probs, x[t], probs[t],
                slots, d, dk, qkvu.stride(1), tk.stride(0), x.stride(1), sqrt_dk,
                HAS_DROP=drop is not None, **sizes)
            _linear(x[t], w_o, m1[t], dot, bias=b_o, res=mt[t, :, :d])
            _linear(m1[t], w_1, hid[t], dot, bias=b_1, relu=True)
            k.gates_forward_kernel[_grid(rows, d)](
                hid[t], w_2, b_2, m1[t], mt[t], qkvu[t, :, 3 * d:], tg[:, t], z[t], mt[t + 1],
                rows, d, slots, hid.stride(1), m1.stride(1), mt.stride(1), qkvu.stride(1), tg.stride(0),
                z.stride(1), mt.stride(1), DOT=dot, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        ctx.save_for_backward(tk, tv, tg, w_first, w_o, w_1, w_2, drop, mt, qkvu, x, m1, hid, z, probs)
        ctx.shape = (batch, tokens, d, slots, heads)
        ctx.dot = dot
        ctx.dtypes = [x.dtype for x in (token_key, token_value, token_gates, memory, w_qkv, b_qkv, w_o, b_o,
                                        w_1, b_1, w_2, b_2, w_u, b_u)]
        states = mt[1:, :, :d].reshape(tokens, batch, slots * d).transpose(0, 1)
        # The plain loop's dtype: its memory (fp32 under autocast) meets the gates' products (bf16).
        return states.to(torch.promote_types(memory.dtype, token_key.dtype), memory_format=torch.contiguous_format)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_states: torch.Tensor):
        k = _kernels()
        tk, tv, tg, w_first, w_o, w_1, w_2, drop, mt, qkvu, x, m1, hid, z, probs = ctx.saved_tensors
        batch, tokens, d, slots, heads = ctx.shape
        rows, dot = batch * slots, ctx.dot
        f32 = {"device": d_states.device, "dtype": torch.float32}
        # dL/d(states) as (T, R, d): token t's rows together.
        gout = d_states.reshape(batch, tokens, rows // batch, d).transpose(0, 1).reshape(tokens, rows, d).float()
        gout = gout.contiguous()
        dqkv = torch.empty(tokens, rows, 3 * d, **f32)
        dgates = torch.empty(tokens, rows, 2 * d, **f32)
        dm1, dh, dz = (torch.empty(tokens, rows, d, **f32) for _ in range(3))
        dtk, dtv = torch.empty(batch, tokens, d, **f32), torch.empty(batch, tokens, d, **f32)
        carry = torch.zeros(rows, d, **f32)  # dL/dM_{t+1} through the loop
        dm2, direct, dx = (torch.empty(rows, d, **f32) for _ in range(3))
        w_qkv, w_u = w_first[:3 * d], w_first[3 * d:]
        dk = d // heads
        sizes = _head_sizes(slots, dk)
        for t in reversed(range(tokens)):
            k.gates_backward_kernel[_grid(rows, d, ELEMENTWISE_BLOCK)](
                gout[t], carry, mt[t], qkvu[t, :, 3 * d:], tg[:, t], m1[t], z[t], dgates[t], dm2, dz[t], direct,
                rows, d, slots, mt.stride(1), qkvu.stride(1), tg.stride(0), dgates.stride(1),
                BLOCK_M=ELEMENTWISE_BLOCK[0], BLOCK_N=ELEMENTWISE_BLOCK[1])
            _linear(dz[t], w_2, dh[t], dot, transpose=False, pos=hid[t])
            _linear(dh[t], w_1, dm1[t], dot, transpose=False, res=dm2)
            _linear(dm1[t], w_o, dx, dot, transpose=False)
            k.attention_backward_kernel[(batch, heads)](
                qkvu[t], tk[:, t], tv[:, t], drop[t] if drop is not None else probs, probs[t], dx, dqkv[t],
                dtk[:, t], dtv[:, t], slots, d, dk, qkvu.stride(1), tk.stride(0), dx.stride(0), dqkv.stride(1),
                dtk.stride(0), float(dk) ** 0.5, HAS_DROP=drop is not None, **sizes)
            k.memory_grad_kernel[_grid(rows, d)](
                dqkv[t], w_qkv, dgates[t], w_u, mt[t], direct, dm1[t], carry, rows, d,
                dqkv.stride(1), dgates.stride(1), mt.stride(1),
                DOT=dot, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        # Every weight gradient: one product over all tokens' rows.
        memory, tanh_memory = mt[:tokens, :, :d].reshape(-1, d), mt[:tokens, :, d:].reshape(-1, d)

        def weight_grads(grad_out: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            grad_out = grad_out.reshape(-1, grad_out.size(-1))
            return grad_out.t() @ inputs.reshape(-1, inputs.size(-1)), grad_out.sum(0)

        dw_qkv, db_qkv = weight_grads(dqkv, memory)
        dw_o, db_o = weight_grads(dm1, x)
        dw_1, db_1 = weight_grads(dh, m1)
        dw_2, db_2 = weight_grads(dz, hid)
        dw_u, db_u = weight_grads(dgates, tanh_memory)
        dtg = dgates.reshape(tokens, batch, slots, 2 * d).sum(2).transpose(0, 1)
        grads = [dtk, dtv, dtg, carry.reshape(batch, slots, d), dw_qkv, db_qkv, dw_o, db_o, dw_1, db_1,
                 dw_2, db_2, dw_u, db_u]
        grads = [g.to(dtype) if needed else None
                 for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)]
        return (*grads, None, None)


class FusedRelationalMemory:
    """A RelationalMemory's forward through the fused kernels (where they can run; the module's own
    forward elsewhere, with one warning naming why)."""

    def __init__(self, rm: nn.Module) -> None:
        self.rm = rm
        self.eager = type(rm).forward.__get__(rm)
        self.said: set[str] = set()
        self.ran = False  # the kernels have run once (compiled)
        self.failed = ""  # why they could not, once they could not

    @classmethod
    def installed(cls, rm: nn.Module) -> "FusedRelationalMemory | None":
        fused = rm.__dict__.get("forward")
        return fused if isinstance(fused, cls) else None

    @classmethod
    def install(cls, rm: nn.Module) -> "FusedRelationalMemory":
        fused = cls.installed(rm)
        if fused is None:
            fused = cls(rm)
            rm.__dict__["forward"] = fused  # not a submodule: state_dict is unchanged
        return fused

    @staticmethod
    def uninstall(rm: nn.Module) -> None:
        rm.__dict__.pop("forward", None)

    def __call__(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        why = self.failed or unfit_input(inputs)
        if why:
            self._say(why)
            return self.eager(inputs, memory)
        if self.ran:
            return self.fused(inputs, memory)
        try:  # the first call compiles the kernels: a toolchain that cannot is not a reason to stop training
            out = self.fused(inputs, memory)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - Triton's compiler and driver errors have no common base
            self.failed = f"its kernels failed to compile or run: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            self._say(self.failed)
            return self.eager(inputs, memory)
        self.ran = True
        return out

    def _say(self, why: str) -> None:
        if why not in self.said:
            self.said.add(why)
            warnings.warn(f"the fused relational memory is off here ({why}); it runs as PyTorch operations",
                          stacklevel=3)

    def fused(self, inputs: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """The forward through the kernels."""
        rm = self.rm
        attn = rm.attn
        # The tokens' shares, hoisted out of the loop as the plain forward does (autograd owns them).
        token_key, token_value, token_gates = (proj(inputs) for proj in (attn.linears[1], attn.linears[2], rm.W))
        memory = memory.reshape(-1, rm.num_slots, rm.d_model)
        drop = self.dropout_mask(*inputs.shape[:2], inputs.device)
        w_qkv, b_qkv = rm._qkv_weights()
        out = attn.linears[-1]
        return _Memory.apply(token_key, token_value, token_gates, memory, w_qkv, b_qkv, out.weight, out.bias,
                             rm.mlp[0].weight, rm.mlp[0].bias, rm.mlp[2].weight, rm.mlp[2].bias,
                             rm.U.weight, rm.U.bias, drop, attn.h)


    def dropout_mask(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor | None:
        """R2Gen's dropout on the attention weights for every token at once: (tokens, batch, heads,
        slots, slots + 1) of 0 (dropped) or 1/(1-p); None outside training or at p = 0."""
        rm, dropout = self.rm, self.rm.attn.dropout
        if not (dropout.training and dropout.p > 0):
            return None
        keep = 1.0 - dropout.p
        mask = torch.empty(tokens, batch, rm.attn.h, rm.num_slots, rm.num_slots + 1, device=device)
        return mask.bernoulli_(keep).div_(keep)


def install_fused_memory(model: nn.Module) -> str:
    """The fused forward on an R2GenModel's relational memory; why not, where it cannot serve it ("" once
    installed)."""
    rm = model.encoder_decoder.model.rm
    why = unfit_module(rm)
    if not why:
        FusedRelationalMemory.install(rm)
    return why
