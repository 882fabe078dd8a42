"""DeepSpeed: ZeRO stage 1 or 2, optimizer offload to the CPU, bf16, fp16 (dynamic loss scaling) or fp32.

The engine's JSON comes from the plan (launcher.engine_config.deepspeed_config) through
`configure` before `prepare`. Three things keep it R2Gen's:
- clipping: R2Gen clips gradient *values* (clip_grad_value_ 0.1); DeepSpeed only clips norms. The
  client optimizer's `step` clamps the gradients it receives, which under ZeRO are the reduced,
  unscaled fp32 partitions: clamping is elementwise, so per partition equals the whole gradient.
- accumulation stays in the shared loop's token-normalized windows: the loop marks the window's
  last micro-batch as the boundary (`set_gradient_accumulation_boundary`) and DeepSpeed does not
  divide the losses again by its accumulation count.
- BatchNorm: the JSON asks for buffers in the weights' dtype (`data_types.buffer_dtype`), as the
  parameters are cast to bf16/fp16 and batch_norm needs its running statistics in the same dtype
  (fp32: nothing is cast).
- autocast: DeepSpeed disables an outer torch.autocast inside its forward; the JSON's `torch_autocast`
  section keeps it on there, so the forward computes as under the other engines.
With offload the optimizer is DeepSpeedCPUAdam, which has no AMSGrad: the one deviation from
R2Gen's Adam(amsgrad=True), stated by `describe()`; `--offload none` keeps torch's Adam(amsgrad).
"""

from __future__ import annotations

import contextlib
import os
import types
from contextlib import AbstractContextManager

import torch

from backends.base import Backend
from backends.plain import check_precision, resolve_device
from r2gen.engine import AUTOCAST_DTYPES
from r2gen.errors import BackendError, ConfigError

PRECISIONS = ("bf16", "fp16", "fp32")


def check_deepspeed_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BackendError(f"--precision {precision}: the deepspeed backend trains in bf16, fp16 or fp32 "
                           "(fp8 is its own engine)")


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    # ZeRO reduces and accumulates each micro-batch's gradients into engine-internal partitions
    # (and, offloaded, CPU buffers) that no public call discards: an out-of-memory error stops the
    # run with a checkpoint instead of redoing the step on top of half a window (tested).
    can_redo_step = False
    # ZeRO-2 makes every parameter a view of one flat buffer at initialize: a layout change afterwards
    # (channels_last) would unlink the model's tensors from what the optimizer steps; its gradient
    # buckets' view(-1) fails on them first (seen on an H200).
    flat_parameters = True

    def __init__(self, device: str = "cuda", precision: str = "bf16"):
        check_deepspeed_precision(precision)
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        if self.device.type == "cpu" and precision == "fp16":
            raise BackendError("--precision fp16: DeepSpeed runs fp16 on GPUs only; use bf16 on a CPU")
        self.precision = precision
        self._join_process_group()
        self.ds_config: dict | None = None
        self.clip_value = 0.0

    def _join_process_group(self) -> None:
        import deepspeed

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if "WORLD_SIZE" not in os.environ:
            # One process, no launcher: a process group of one, without a TCP rendezvous (kept for
            # the process's later engines: DeepSpeed caches its groups).
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                     world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # the engine insists on it, as a launcher would set it
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.device.type == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        deepspeed.init_distributed(dist_backend=backend)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

    def configure(self, ds_config: dict) -> None:
        """The engine's JSON, generated from the plan; needed before prepare()."""
        self.ds_config = ds_config

    @property
    def offload(self) -> bool:
        return bool(self.ds_config and "offload_optimizer" in self.ds_config["zero_optimization"])

    def prepare(self, model, make_optimizer):
        import deepspeed

        if self.ds_config is None:
            raise ConfigError("deepspeed: no engine config; the launcher generates one from the plan")
        # The optimizer is built for where it steps (build_optimizer fuses it there): without offload ZeRO
        # steps its fp32 partitions on the GPU, with offload DeepSpeedCPUAdam steps them on the CPU.
        if not self.offload:
            model.to(self.device)
        optimizer = make_optimizer(model)
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            from torch.utils.cpp_extension import is_ninja_available

            if not is_ninja_available():  # DeepSpeed would only say the cpu_adam op "failed to build/load"
                raise BackendError("deepspeed --offload cpu: DeepSpeedCPUAdam is JIT-built with ninja, which is "
                                   "not on PATH (pip install ninja; or --offload none)")
            d = optimizer.defaults
            try:
                optimizer = DeepSpeedCPUAdam([{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups],
                                             lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                                             adamw_mode=False)  # Adam's L2 weight decay, as torch.optim.Adam
            except RuntimeError as err:  # the JIT build failed; the compiler's output went to stdout
                raise BackendError(f"deepspeed --offload cpu: DeepSpeedCPUAdam could not be built ({err}); it needs "
                                   "a C++ compiler and the Python headers (see the build output above), or use "
                                   "--offload none") from err
        # Clamp on the instance, not in a subclass: DeepSpeed accepts only the optimizer classes it knows.
        # A bound method, as LR schedulers expect of optimizer.step (they wrap its __func__).
        unclipped, backend = optimizer.step, self

        @torch.no_grad()
        def step_with_value_clipping(opt, *args, **kwargs):
            if backend.clip_value:
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.clamp_(-backend.clip_value, backend.clip_value)
            return unclipped(*args, **kwargs)

        optimizer.step = types.MethodType(step_with_value_clipping, optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        # The client optimizer, whose param_groups (now ZeRO's flat fp32 partitions) the engine steps:
        # the LR scheduler and the logged learning rates act on it.
        return engine, optimizer

    def autocast(self) -> AbstractContextManager:
        # The engine holds bf16/fp16 weights; autocast casts the fp32 inputs and runs the loss in fp32.
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward_and_step(self, loss, model, optimizer, clip_value, step=True) -> bool:
        self.clip_value = clip_value
        model.set_gradient_accumulation_boundary(step)
        model.backward(loss, scale_wrt_gas=False)  # the loop already divided by the window's tokens
        if not step:
            return True
        model.step()
        return model.was_step_applied()

    def unwrap(self, model):
        return getattr(model, "module", model)

    # The fp32 master weights and optimizer states are ZeRO partitions, one per process: DeepSpeed's
    # own checkpoint (every process writes and reads its part) is what resumes them.
    saves_engine = True

    def save_engine(self, model, folder) -> None:
        model.save_checkpoint(str(folder), tag="engine", client_state={}, save_latest=False)

    def load_engine(self, model, folder) -> None:
        path, _ = model.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"--keep-training: {folder} holds no DeepSpeed engine checkpoint")

    def describe(self) -> str:
        zero = self.ds_config["zero_optimization"]["stage"] if self.ds_config else "?"
        optimizer = "DeepSpeedCPUAdam on the CPU (no AMSGrad)" if self.offload else "Adam(amsgrad) on the GPU"
        return (f"deepspeed ZeRO-{zero}, {optimizer}, on {self.device} ({self.precision}, "
                f"{self.world_size} process(es))")
