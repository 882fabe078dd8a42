"""Hugging Face Accelerate: Accelerator with mixed precision no/fp16/bf16, on CPU or GPU.

Accumulation stays in the shared loop (one loader batch is one window, split into micro-batches
whose losses are divided by the window's token count): Accelerate's own `gradient_accumulation_steps`
divides every micro-batch loss by the number of micro-batches, which is per-call, not per-token,
normalization. Non-final micro-batches run under `accelerator.no_sync`, so several processes
all-reduce once per window, as Accelerate's accumulation does.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from backends.base import Backend, step_was_taken
from backends.plain import check_precision, resolve_device
from r2gen.errors import BackendError, ConfigError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
"""Our precision names -> Accelerate's mixed_precision (Accelerator argument and config YAML)."""


class AccelerateBackend(Backend):
    name = "accelerate"
    cuda_graphs = True  # the step runs the model's own forward here

    def __init__(self, device: str = "cuda", precision: str = "bf16"):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        resolved = resolve_device(device)
        check_precision(precision, resolved)
        if precision == "fp16" and resolved.type == "cpu":
            raise BackendError("--precision fp16: Accelerate runs fp16 on GPUs only; use bf16 or fp32 on a CPU")
        # One Accelerator per process; a previous one (tests, notebooks) would impose its precision.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.accelerator = Accelerator(mixed_precision=MIXED_PRECISION[precision], cpu=resolved.type == "cpu")
        self.device = self.accelerator.device
        self.precision = precision
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

    def prepare(self, model, make_optimizer):
        model.to(self.device)  # first, as the plain engine does: the optimizer is built for where it steps
        return self.accelerator.prepare(model, make_optimizer(model))

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast() if self.precision != "fp32" else contextlib.nullcontext()

    def backward_and_step(self, loss, model, optimizer, clip_value, step=True) -> bool:
        sync = contextlib.nullcontext() if step else self.accelerator.no_sync(model)
        with sync:
            self.accelerator.backward(loss)
        if not step:
            return True
        self.accelerator.clip_grad_value_(model.parameters(), clip_value)  # unscales fp16 gradients first
        # Not accelerator.optimizer_step_was_skipped: it misses a fused Adam's skip (step_was_taken).
        stepped = step_was_taken(self.accelerator.scaler, optimizer.step)  # steps and updates the scaler
        optimizer.zero_grad(set_to_none=True)
        return stepped

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    # Accelerate's own checkpoint (model, optimizer, loss scaler, every process's RNG states), as
    # --keep-training promises; the loop's loop.pt beside it holds the rest of the run's state.
    saves_engine = True

    def save_engine(self, model, folder) -> None:
        self.accelerator.save_state(str(folder))

    def load_engine(self, model, folder) -> None:
        if not (folder / "optimizer.bin").is_file():
            raise ConfigError(f"--keep-training: {folder} holds no Accelerate state (optimizer.bin missing)")
        self.accelerator.load_state(str(folder))
