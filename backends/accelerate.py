"""Hugging Face Accelerate: Accelerator with mixed precision no/fp16/bf16, on CPU or GPU.

Accumulation stays in the shared loop (one loader batch is one window, split into micro-batches
whose losses are divided by the window's token count): Accelerate's own `gradient_accumulation_steps`
divides every micro-batch loss by the number of micro-batches, which is per-call, not per-token,
normalization. Several processes share one model without DistributedDataParallel's wrapper: each
window's gradients are averaged once in `step`, after every process agreed that its window ran
(r2gen.step.train_step; Backend.reduce_window). Its SPEC (at the end) writes the
YAML `accelerate launch --config_file` reads.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from backends.base import Backend, step_was_taken
from backends.plain import check_precision, resolve_device
from backends.spec import EngineFile, EngineSpec, Topology, get_dotted
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
        # Not wrapped in DistributedDataParallel (evaluation_mode skips only that; mixed precision applies):
        # several processes share rank 0's weights here and average each window's gradients in step
        # (Backend.reduce_window), so no collective runs inside forward or backward.
        model = self.accelerator.prepare_model(model, evaluation_mode=True)
        self.share_first_weights(model)
        return model, self.accelerator.prepare_optimizer(make_optimizer(model))

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast() if self.precision != "fp32" else contextlib.nullcontext()

    def backward(self, loss, model, last) -> None:
        # Gradients stay in this process: step reduces the window once every process agreed it ran.
        self.accelerator.backward(loss)

    def step(self, model, optimizer, clip_value) -> bool:
        self.reduce_window(model)
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


# -- the spec --------------------------------------------------------------------------------------------

ACCELERATE_LAUNCH = (sys.executable, "-m", "accelerate.commands.launch")
"""`accelerate launch`, run by this interpreter (a venv that is not on PATH still finds it)."""


def accelerate_launch_command(topology: Topology, module: str, worker_args: Sequence[str],
                              engine_file: Path | None = None, hostfile: Path | None = None) -> list[str]:
    """accelerate launch with the generated YAML, which holds the topology."""
    if engine_file is None:
        raise ConfigError("accelerate launch needs the generated accelerate_configs/<run>.yaml")
    return [*ACCELERATE_LAUNCH, "--config_file", str(engine_file), "-m", module, *worker_args]


def accelerate_yaml(device: str, precision: str, topology: Topology) -> dict:
    """The YAML mapping `accelerate launch --config_file` reads (the keys `accelerate config` writes)."""
    multi = topology.world_size > 1
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": ("MULTI_GPU" if device == "cuda" else "MULTI_CPU") if multi else "NO",
        "mixed_precision": MIXED_PRECISION[precision],
        "use_cpu": device == "cpu",
        "num_processes": topology.world_size,
        "num_machines": topology.nodes,
        "machine_rank": topology.node_rank,
        "main_process_ip": topology.master_addr if topology.nodes > 1 else None,
        "main_process_port": topology.master_port if multi else None,
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "debug": False,
    }


ACCELERATE_PLANNED: dict[str, str] = {
    "compute_environment": "nothing: runs start on this machine (LOCAL_MACHINE)",
    "distributed_type": "--gpus and --nodes", "mixed_precision": "--precision", "use_cpu": "--device",
    "num_processes": "--gpus and --nodes", "num_machines": "--nodes", "machine_rank": "--node-rank",
    "main_process_ip": "--master-addr", "main_process_port": "--master-port",
}
"""Accelerate fields the plan decides, and the flag that sets them."""


def accelerate_file_choices(user: dict) -> dict:
    """The precision a user's YAML asks for (its mixed_precision), for a run without --precision."""
    precision = {value: key for key, value in MIXED_PRECISION.items()}.get(get_dotted(user, "mixed_precision"))
    return {"precision": precision} if precision else {}


SPEC = EngineSpec(
    name="accelerate",
    summary=("Train and evaluate R2Gen through Hugging Face Accelerate (mixed precision; default bf16 on a "
            "GPU, fp32 on a CPU), from a probed plan; --gpus N: accelerate launch with the generated YAML."),
    title="Accelerate",
    adapter=lambda device, precision, options: AccelerateBackend(device, precision),
    devices=("cuda", "cpu"), precisions=("fp32", "bf16", "fp16"),
    default_precisions={"cuda": "bf16", "cpu": "fp32"}, gpu_only_precisions=("fp16",),
    # accelerate launch starts several CPU processes only through MPI; it would silently run one.
    one_cpu_process="accelerate launch runs one process on a CPU (several need MPI)",
    packages=("accelerate",),
    launch=accelerate_launch_command,
    file=EngineFile(name="accelerate_config.yaml", flag="--accelerate-config", option="accelerate_config",
                    format="yaml", build=lambda i: accelerate_yaml(i.device, i.precision, i.topology),
                    planned=ACCELERATE_PLANNED, choices=accelerate_file_choices,
                    help="Your own `accelerate config` YAML to start from: mixed_precision, num_processes, use_cpu "
                         "and the machine fields must agree with the plan (a field that disagrees is refused, "
                         "naming it). The run keeps the merged file as <run>/accelerate_config.yaml."),
)
