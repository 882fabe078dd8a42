"""DeepSpeed: ZeRO stage 1 or 2, optimizer offload to the CPU, bf16, fp16 (dynamic loss scaling) or fp32.

The engine's JSON (`deepspeed_json`, from the plan's values; its SPEC, at the end, says so) reaches
the adapter through `configure` before `prepare`. Three things keep it R2Gen's:
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
- resume (`load_engine`) reads the engine's files weights-only (r2gen.checkpoint.load_checkpoint, with
  the few DeepSpeed classes its ZeRO states hold): DeepSpeed's own reader unpickles them in full, so a
  doctored file would run its code; here it is refused (exit 2) naming the file.
With offload the optimizer is DeepSpeedCPUAdam, which has no AMSGrad: the one deviation from
R2Gen's Adam(amsgrad=True), stated by `describe()`; `--offload none` keeps torch's Adam(amsgrad).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.base import Backend
from backends.plain import check_precision, resolve_device
from backends.spec import EngineFile, EngineSpec, LaunchOption, Topology, get_dotted, option
from r2gen.checkpoint import UnreadableCheckpoint, load_checkpoint
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

    def backward(self, loss, model, last) -> None:
        # ZeRO reduces inside backward (its hooks): the window cannot be dropped by one process (can_redo_step).
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)  # the loop already divided by the window's tokens

    def step(self, model, optimizer, clip_value) -> bool:
        self.clip_value = clip_value
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
        own = model.checkpoint_engine
        model.checkpoint_engine = WeightsOnlyReads(own)  # every file DeepSpeed reads goes through its engine
        try:
            path, _ = model.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        except UnreadableCheckpoint as exc:
            raise ConfigError(f"--keep-training: {exc}") from None
        finally:
            model.checkpoint_engine = own
        if path is None:
            raise ConfigError(f"--keep-training: {folder} holds no DeepSpeed engine checkpoint")

    def describe(self) -> str:
        zero = self.ds_config["zero_optimization"]["stage"] if self.ds_config else "?"
        optimizer = "DeepSpeedCPUAdam on the CPU (no AMSGrad)" if self.offload else "Adam(amsgrad) on the GPU"
        return (f"deepspeed ZeRO-{zero}, {optimizer}, on {self.device} ({self.precision}, "
                f"{self.world_size} process(es))")


def deepspeed_state_classes() -> list[type]:
    """The classes besides tensors and plain data that DeepSpeed's ZeRO optimizer states pickle (seen in
    its bf16, fp16 and fp32 files): the loss scaler, the ZeRO stage and the parameters' fragment
    addresses, all plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyReads:
    """A DeepSpeed checkpoint engine whose `load` reads weights-only (everything else is the engine's):
    DeepSpeed's TorchCheckpointEngine.load calls torch.load(weights_only=False)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def load(self, path: str, map_location=None):
        return load_checkpoint(Path(path), map_location, allowed=deepspeed_state_classes())


# -- the spec --------------------------------------------------------------------------------------------

ZERO_STAGES = (1, 2)
OFFLOADS = ("cpu", "none")


@dataclass(frozen=True)
class DeepSpeedOptions:
    """`r2gen-launch deepspeed` engine options."""

    zero: int = option(2, "ZeRO stage: 1 (optimizer states partitioned over processes) or 2 (and gradients); "
                          "3 is refused.")
    offload: str = option("cpu", "cpu: optimizer states and step on the CPU (DeepSpeedCPUAdam, without AMSGrad); "
                                 "none: on the GPU (Adam with AMSGrad, as R2Gen).")

    def __post_init__(self) -> None:
        if self.zero == 3:
            raise BackendError("--zero 3: not supported: R2Gen's 78M parameters fit on any GPU this launcher "
                               "targets, and stage 3's parameter partitioning only slows it; use --zero 2")
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"--zero: unknown stage {self.zero}; choose 1 or 2")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"--offload: unknown {self.offload!r}; choose one of {', '.join(OFFLOADS)}")


def deepspeed_json(precision: str, micro_batch: int, accumulation: int, world_size: int, pin_memory: bool,
                   options: DeepSpeedOptions) -> dict:
    """DeepSpeed's JSON from plain values (the probe's engine has no plan yet: micro-batch 1). Optimizer
    and clipping are left to the adapter: R2Gen clips gradient values (clip_grad_value_), which
    DeepSpeed's norm-based `gradient_clipping` is not."""
    check_deepspeed_precision(precision)
    zero: dict = {"stage": options.zero, "contiguous_gradients": True, "overlap_comm": True,
                  "reduce_scatter": True, "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000}
    if options.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    mixed = precision != "fp32"
    return {
        "train_batch_size": micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # BatchNorm needs its running statistics in the weights' dtype (the parameters become bf16/fp16).
        "data_types": {"buffer_dtype": precision if mixed else None},
        # Autocast inside the engine too (DeepSpeed turns an outer one off): tensors the model creates in fp32
        # (the relational memory's first state) meet bf16/fp16 weights, and norms and softmax run in fp32.
        "torch_autocast": {"enabled": True, "dtype": precision} if mixed else {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


DEEPSPEED_PLANNED: dict[str, str] = {
    "train_batch_size": "--effective-batch",
    "train_micro_batch_size_per_gpu": "--micro-batch",
    "gradient_accumulation_steps": "--effective-batch and --micro-batch",
    "gradient_clipping": "nothing: R2Gen clips gradient values (0.1) in the adapter; leave it 0",
    "bf16.enabled": "--precision", "fp16.enabled": "--precision",
    "data_types.buffer_dtype": "--precision", "torch_autocast.enabled": "--precision",
    "torch_autocast.dtype": "--precision",
    "zero_optimization.stage": "--zero", "zero_optimization.offload_optimizer.device": "--offload",
}
"""DeepSpeed fields the plan decides (dotted paths), and the flag that sets them."""
DEEPSPEED_REFUSED: dict[str, str] = {
    "optimizer": "R2Gen's Adam (AMSGrad, two learning rates) comes from the run's settings",
    "scheduler": "R2Gen's StepLR comes from the run's settings",
    "zero_optimization.offload_param": "parameter offload is ZeRO-3's, which is refused",
}


def deepspeed_file_choices(user: dict) -> dict:
    """What a user's JSON says about precision, --zero and --offload, for the flags left out."""
    choices: dict = {}
    if get_dotted(user, "bf16.enabled") is True:
        choices["precision"] = "bf16"
    elif get_dotted(user, "fp16.enabled") is True:
        choices["precision"] = "fp16"
    stage = get_dotted(user, "zero_optimization.stage")
    if isinstance(stage, int) and not isinstance(stage, bool):
        choices["zero"] = stage
    device = get_dotted(user, "zero_optimization.offload_optimizer.device")
    if device in OFFLOADS:
        choices["offload"] = device
    return choices


DEEPSPEED = (sys.executable, "-m", "deepspeed.launcher.runner")
"""The `deepspeed` launcher, run by this interpreter (a venv that is not on PATH still finds it)."""


def deepspeed_launch_command(topology: Topology, module: str, worker_args: Sequence[str],
                             engine_file: Path | None = None, hostfile: Path | None = None) -> list[str]:
    """The deepspeed launcher with its JSON; a hostfile starts the other nodes over ssh."""
    t = topology
    if engine_file is None:
        raise ConfigError("the deepspeed launcher needs the generated ds_configs/<run>.json")
    command = [*DEEPSPEED]
    if hostfile is not None:
        if not hostfile.is_file():
            raise ConfigError(f"--hostfile: {hostfile} does not exist")
        command += ["--hostfile", str(hostfile)]
    elif t.nodes > 1:
        # Without a hostfile every node is started by hand with its rank (no ssh from the launcher).
        command += ["--no_ssh", f"--node_rank={t.node_rank}"]
    # The worker reads LOCAL_RANK from its environment, as under torchrun: no --local_rank argument.
    command += [f"--num_nodes={t.nodes}", f"--num_gpus={t.gpus_per_node}", f"--master_addr={t.master_addr}",
                f"--master_port={t.master_port}", "--no_local_rank", "--module", module, *worker_args,
                "--deepspeed_config", str(engine_file)]
    return command


SPEC = EngineSpec(
    name="deepspeed",
    summary=("Train and evaluate R2Gen with DeepSpeed ZeRO (stage 2 and CPU optimizer offload by default; "
            "bf16, or fp16 with dynamic loss scaling), from a probed plan and the generated JSON; GPUs only."),
    title="DeepSpeed",
    adapter=lambda device, precision, options: DeepSpeedBackend(device, precision),  # options: its JSON
    # ZeRO-2's offload has nothing to offer a CPU (the adapter runs there for tests only).
    devices=("cuda",), precisions=("fp32", "bf16", "fp16"),
    default_precisions={"cuda": "bf16", "cpu": "fp32"}, gpu_only_precisions=("fp16",),
    options=DeepSpeedOptions, packages=("deepspeed",),
    launch=deepspeed_launch_command,
    file=EngineFile(name="ds_config.json", flag="--ds-config", option="ds_config", format="json",
                    build=lambda i: deepspeed_json(i.precision, i.micro_batch, i.accumulation, i.world_size,
                                                   i.pin_memory, DeepSpeedOptions(**i.options)),
                    planned=DEEPSPEED_PLANNED, refused=DEEPSPEED_REFUSED, choices=deepspeed_file_choices,
                    help="Your own DeepSpeed JSON to start from: the plan fills what it leaves out or sets to "
                         "\"auto\"; a batch size, precision or ZeRO setting that disagrees with the plan is refused, "
                         "naming the field. The run keeps the merged file as <run>/ds_config.json."),
    options_note=lambda options: "DeepSpeedCPUAdam has no AMSGrad (R2Gen's Adam has)"
    if options.get("offload") == "cpu" else "",
    launch_options=(LaunchOption("hostfile", "deepspeed: a DeepSpeed hostfile ('host slots=N' lines); the launcher "
                                             "then starts every node over ssh.", "none: this machine only"),),
    on_configure=lambda adapter, config: adapter.configure(config),
)
