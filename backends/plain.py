"""Plain PyTorch: fp32, or autocast bf16/fp16 (fp16 with a dynamic GradScaler), on CPU or one GPU;
several processes under torchrun (data parallel: Backend.reduce_window). Its SPEC is at the end."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from backends.base import Backend, step_was_taken
from backends.spec import EngineSpec, Topology
from r2gen.config import DEVICES, PRECISIONS
from r2gen.engine import AUTOCAST_DTYPES
from r2gen.errors import BackendError


def resolve_device(device: str) -> torch.device:
    """Validate --device against this machine."""
    if device not in DEVICES:
        raise BackendError(f"--device: unknown {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: no CUDA GPU is visible on this machine (use --device cpu)")
    return torch.device(device)


def check_precision(precision: str, device: torch.device) -> None:
    """Validate --precision against the device (every adapter's autocast precisions)."""
    if precision == "fp8":
        raise BackendError("--precision fp8: FP8 training runs on its own backend: r2gen-launch fp8")
    if precision not in PRECISIONS:
        raise BackendError(f"--precision: unknown {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BackendError(f"--precision bf16: {torch.cuda.get_device_name()} does not support bfloat16; "
                           "use --precision fp16")


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; joins the process group when the
    world is larger than one (NCCL on GPUs, gloo on CPUs)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, world, local


class PlainBackend(Backend):
    """Plain PyTorch; under torchrun (WORLD_SIZE > 1) one process per GPU, rank 0's weights shared at the
    start and each window's gradients averaged by `step` (data parallel, as DistributedDataParallel
    computes it, without its collectives inside forward and backward: Backend.reduce_window)."""

    name = "plain"
    cuda_graphs = True  # the step runs the model's own forward here

    def __init__(self, device: str = "cpu", precision: str = "fp32"):
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        self.rank, self.world_size, local = init_distributed(self.device.type)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local)
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def prepare(self, model, make_optimizer):
        model.to(self.device)
        optimizer = make_optimizer(model)  # after the move: its state lives beside the parameters
        self.share_first_weights(model)  # several processes: one model (see Backend.reduce_window)
        return model, optimizer

    def unwrap(self, model):
        return getattr(model, "module", model)

    def autocast(self) -> AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss, model, last) -> None:
        # Gradients stay in this process: step reduces the window once every process agreed it ran.
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, model, optimizer, clip_value) -> bool:
        self.reduce_window(model)
        if self.scaler is None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return True
        # Clip the true gradients, not the scaled ones.
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        stepped = step_was_taken(self.scaler, lambda: (self.scaler.step(optimizer), self.scaler.update()))
        optimizer.zero_grad(set_to_none=True)
        return stepped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


# -- the spec --------------------------------------------------------------------------------------------

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
"""torchrun's entry point, run by this interpreter (a venv that is not on PATH still finds it)."""


def torchrun_command(topology: Topology, module: str, worker_args: Sequence[str], engine_file: Path | None = None,
                     hostfile: Path | None = None) -> list[str]:
    """torchrun with the topology's multi-node options (no engine file; a hostfile is DeepSpeed's)."""
    t = topology
    return [*TORCHRUN, f"--nproc_per_node={t.gpus_per_node}", f"--nnodes={t.nodes}", f"--node_rank={t.node_rank}",
            f"--master_addr={t.master_addr}", f"--master_port={t.master_port}", "-m", module, *worker_args]


SPEC = EngineSpec(
    name="plain",
    summary=("Train and evaluate R2Gen with plain PyTorch (default fp32), from a probed plan; --gpus N: "
            "data parallel under torchrun (each window's gradients averaged once)."),
    title="plain PyTorch",
    adapter=lambda device, precision, options: PlainBackend(device, precision),
    devices=("cuda", "cpu"), precisions=("fp32", "bf16", "fp16"),
    default_precisions={"cuda": "fp32", "cpu": "fp32"},  # fp32, as R2Gen
    launch=torchrun_command,
)
