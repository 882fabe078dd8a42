"""Engine configs generated from the Plan: DeepSpeed JSON and Accelerate YAML, as plain dicts.

Pure: the values follow from the plan (train_batch_size = micro x accumulation x world size, the
precision, the loader's pinning) and from the engine options; a user's own file (--ds-config,
--accelerate-config) adds its other settings, and a field the plan decides must agree with it.
`engine_config_for` places the run's file in its run directory (`<run>/ds_config.json`,
`<run>/accelerate_config.yaml`: reproducible, and found again by --keep-training) and
`write_engine_config` writes it atomically. Each dict is what the engine's own loader accepts (tested against DeepSpeed's DeepSpeedConfig and accelerate's
load_config_from_file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from backends.accelerate import MIXED_PRECISION
from launcher.plan import Plan
from r2gen.atomic import write_text
from r2gen.errors import BackendError, ConfigError

ZERO_STAGES = (1, 2)
OFFLOADS = ("cpu", "none")


@dataclass(frozen=True)
class DeepSpeedOptions:
    """`r2gen-launch deepspeed` engine options."""

    zero: int = 2            # ZeRO stage: 1 (optimizer states) or 2 (+ gradients) partitioned
    offload: str = "cpu"     # optimizer states and step on the CPU (DeepSpeedCPUAdam), or none

    def __post_init__(self) -> None:
        if self.zero == 3:
            raise BackendError("--zero 3: not supported: R2Gen's 78M parameters fit on any GPU this launcher "
                               "targets, and stage 3's parameter partitioning only slows it; use --zero 2")
        if self.zero not in ZERO_STAGES:
            raise ConfigError(f"--zero: unknown stage {self.zero}; choose 1 or 2")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"--offload: unknown {self.offload!r}; choose one of {', '.join(OFFLOADS)}")


@dataclass(frozen=True)
class Topology:
    """Processes of a run: GPUs per node and nodes (multi-node options passed to the launchers)."""

    gpus_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus: must be at least 1, got {self.gpus_per_node}")
        if self.nodes < 1:
            raise ConfigError(f"--nodes: must be at least 1, got {self.nodes}")
        if not 0 <= self.node_rank < self.nodes:
            raise ConfigError(f"--node-rank: must be in 0..{self.nodes - 1}, got {self.node_rank}")
        if not 1 <= self.master_port <= 65535:
            raise ConfigError(f"--master-port: must be a TCP port (1-65535), got {self.master_port}")
        if not self.master_addr:
            raise ConfigError("--master-addr: must not be empty")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


def deepspeed_config(plan: Plan, options: DeepSpeedOptions) -> dict:
    """DeepSpeed's JSON for the plan. Optimizer and clipping are left to the adapter: R2Gen clips
    gradient values (clip_grad_value_), which DeepSpeed's norm-based `gradient_clipping` is not."""
    b = plan.batch
    return deepspeed_json(plan.precision, b.micro_batch, b.accumulation, b.world_size, plan.loader.pin_memory, options)


def deepspeed_json(precision: str, micro_batch: int, accumulation: int, world_size: int, pin_memory: bool,
                   options: DeepSpeedOptions) -> dict:
    """The JSON from plain values (the probe's engine has no plan yet: micro-batch 1)."""
    from backends.deepspeed import check_deepspeed_precision

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


def accelerate_config(plan: Plan, topology: Topology) -> dict:
    """The YAML mapping `accelerate launch --config_file` reads (the keys `accelerate config` writes)."""
    multi = topology.world_size > 1
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": ("MULTI_GPU" if plan.device == "cuda" else "MULTI_CPU") if multi else "NO",
        "mixed_precision": MIXED_PRECISION[plan.precision],
        "use_cpu": plan.device == "cpu",
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


@dataclass(frozen=True)
class EngineConfig:
    """A run's engine config: the mapping, where it goes (in the run directory), and the file's text."""

    config: dict
    path: Path
    text: str


DEEPSPEED_FILE, ACCELERATE_FILE = "ds_config.json", "accelerate_config.yaml"


def deepspeed_text(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def accelerate_text(config: dict, run_name: str) -> str:
    import yaml

    return (f"# written by r2gen-launch for run {run_name}: the plan's values (with your --accelerate-config's)\n"
            + yaml.safe_dump(config, sort_keys=True))


# -- a user's own engine file: fields the plan decides must agree, the rest is theirs -------------------

DEEPSPEED_PLANNED: dict[str, str] = {
    "train_batch_size": "--effective-batch",
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--effective-batch and --batch-size",
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
ACCELERATE_PLANNED: dict[str, str] = {
    "compute_environment": "nothing: runs start on this machine (LOCAL_MACHINE)",
    "distributed_type": "--gpus and --nodes", "mixed_precision": "--precision", "use_cpu": "--device",
    "num_processes": "--gpus and --nodes", "num_machines": "--nodes", "machine_rank": "--node-rank",
    "main_process_ip": "--master-addr", "main_process_port": "--master-port",
}
AUTO = "auto"  # DeepSpeed's and the HF integration's word for "let the launcher decide"


def read_engine_file(path: Path, flag: str) -> dict:
    """A user's DeepSpeed JSON or accelerate YAML, as data (safe loaders: nothing in it runs)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"{flag}: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if flag == "--ds-config" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        kind = "JSON" if flag == "--ds-config" else "YAML"
        raise ConfigError(f"{flag}: {path} is not valid {kind} ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path} must hold a mapping of settings")
    return data


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):  # an empty section sets nothing
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _get(data: dict, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def merge_engine_file(generated: dict, user: dict, planned: dict[str, str], refused: dict[str, str],
                      flag: str, path: Path) -> dict:
    """The generated config with the user's settings added. A planned field the user set to another
    value than the plan's (other than "auto") is a ConfigError naming the field, both values and
    the flag that sets it; a refused field is one too."""
    leaves = _leaves(user)
    for dotted in leaves:
        for field, why in refused.items():
            if dotted == field or dotted.startswith(field + "."):
                raise ConfigError(f"{flag}: {path}: {field}: not accepted ({why}); remove it")
    merged = json.loads(json.dumps(generated))
    for dotted, value in leaves.items():
        if value == AUTO:
            continue
        covered = next((f for f in planned if dotted == f or f.startswith(dotted + ".")), None)
        if covered is not None:
            wanted = _get(generated, dotted)
            if value != wanted:
                raise ConfigError(f"{flag}: {path}: {dotted} is {value!r}, the plan's is {wanted!r}; set it with "
                                  f"{planned[covered]}, or write \"auto\" (or leave it out) to take the plan's")
            continue
        _set(merged, dotted, value)
    return merged


def engine_file_choices(user: dict, flag: str) -> dict:
    """What a user's file says about the choices its flags make, for the flags the user left out:
    precision, and DeepSpeed's zero and offload."""
    choices: dict = {}
    if flag == "--ds-config":
        if _get(user, "bf16.enabled") is True:
            choices["precision"] = "bf16"
        elif _get(user, "fp16.enabled") is True:
            choices["precision"] = "fp16"
        stage = _get(user, "zero_optimization.stage")
        if isinstance(stage, int) and not isinstance(stage, bool):
            choices["zero"] = stage
        device = _get(user, "zero_optimization.offload_optimizer.device")
        if device in OFFLOADS:
            choices["offload"] = device
    else:
        precision = {value: key for key, value in MIXED_PRECISION.items()}.get(_get(user, "mixed_precision"))
        if precision:
            choices["precision"] = precision
    return choices


def without_planned(config: dict, planned: dict[str, str]) -> dict:
    """A run's own engine file with the plan's fields taken out (--keep-training re-plans them)."""
    kept = json.loads(json.dumps(config))
    for dotted in planned:
        *parents, last = dotted.split(".")
        parent = _get(kept, ".".join(parents)) if parents else kept
        if isinstance(parent, dict):
            parent.pop(last, None)
    return kept


def engine_config_for(plan: Plan, topology: Topology, run_dir: Path, user: dict | None = None,
                      user_path: Path | None = None) -> EngineConfig | None:
    """`<run>/ds_config.json` for deepspeed, `<run>/accelerate_config.yaml` for accelerate (the plan's
    values, merged with `user`, the user's own file, where given), None for plain and fp8."""
    if plan.backend == "deepspeed":
        config = deepspeed_config(plan, DeepSpeedOptions(**plan.engine))
        if user is not None:
            config = merge_engine_file(config, user, DEEPSPEED_PLANNED, DEEPSPEED_REFUSED, "--ds-config",
                                       user_path or run_dir / DEEPSPEED_FILE)
        return EngineConfig(config, run_dir / DEEPSPEED_FILE, deepspeed_text(config))
    if plan.backend == "accelerate":
        config = accelerate_config(plan, topology)
        if user is not None:
            config = merge_engine_file(config, user, ACCELERATE_PLANNED, {}, "--accelerate-config",
                                       user_path or run_dir / ACCELERATE_FILE)
        return EngineConfig(config, run_dir / ACCELERATE_FILE, accelerate_text(config, run_dir.name))
    return None


def stored_engine_file(plan: Plan, run_dir: Path) -> dict | None:
    """--keep-training: the run's own engine file (the user's settings in it), without the plan's fields."""
    name, planned = {"deepspeed": (DEEPSPEED_FILE, DEEPSPEED_PLANNED),
                     "accelerate": (ACCELERATE_FILE, ACCELERATE_PLANNED)}.get(plan.backend, (None, None))
    if name is None or not (run_dir / name).is_file():
        return None
    flag = "--ds-config" if plan.backend == "deepspeed" else "--accelerate-config"
    return without_planned(read_engine_file(run_dir / name, flag), planned)


def write_engine_config(engine: EngineConfig) -> Path:
    write_text(engine.path, engine.text)
    return engine.path


# -- checked-in examples (regenerate with `python -m launcher.engine_config`) ---------------------------

def _example_plan(precision: str, largest: int, world: int, policy: str) -> Plan:
    from launcher.hardware import HostFacts
    from launcher.plan import plan_batch
    from launcher.thresholds import Thresholds, plan_loader

    host = HostFacts(ram_total_gib=64, ram_available_gib=48, swap_total_gib=0, swap_used_gib=0, usable_cpus=16)
    return Plan("example", "cuda", precision, plan_batch(largest, world, policy, 16, "sqrt", 5e-5, 1e-4),
                plan_loader(host, Thresholds(), 1.0, world, True), None, None, {})


EXAMPLES: dict[str, tuple[str, object]] = {
    "ds_configs/example_zero2_offload_8gb_bf16.json": (
        "An 8 GB card in bf16: the probe found room for 6 studies, so 3 micro-batches of 6 make R2Gen's "
        "16 (rounded up to 18); optimizer states and step on the CPU (ZeRO-2 offload).",
        lambda: deepspeed_config(_example_plan("bf16", 6, 1, "faithful"), DeepSpeedOptions(2, "cpu"))),
    "ds_configs/example_zero2_2gpu_fp16.json": (
        "Two GPUs without bf16 (e.g. V100s): fp16 with dynamic loss scaling, ZeRO-2 without offload, "
        "throughput policy at 64 studies per GPU.",
        lambda: deepspeed_config(_example_plan("fp16", 64, 2, "throughput"), DeepSpeedOptions(2, "none"))),
    "accelerate_configs/example_1gpu_bf16.yaml": (
        "One GPU, bf16 mixed precision.",
        lambda: accelerate_config(_example_plan("bf16", 64, 1, "throughput"), Topology())),
    "accelerate_configs/example_2nodes_4gpus_fp16.yaml": (
        "Two nodes with 4 GPUs each, fp16; this file is node 0's (node 1's differs in machine_rank).",
        lambda: accelerate_config(_example_plan("fp16", 32, 8, "throughput"),
                                  Topology(gpus_per_node=4, nodes=2, node_rank=0, master_addr="10.0.0.1"))),
}
"""Example engine configs, as the planner writes them for the situation described."""


def example_text(path: str) -> str:
    import yaml

    comment, build = EXAMPLES[path]
    config = build()  # type: ignore[operator]
    if path.endswith(".json"):
        return deepspeed_text(config)
    return (f"# Example generated by r2gen-launch (launcher/engine_config.py, EXAMPLES). {comment}\n"
            "# Runs write their own <run>/accelerate_config.yaml from their plan.\n"
            + yaml.safe_dump(config, sort_keys=True))


def examples_readme() -> str:
    lines = ["# DeepSpeed configs", "",
             "Runs write `<run>/ds_config.json` from their plan (with the settings of `--ds-config FILE`",
             "where given). The examples here are generated by `python -m launcher.engine_config`",
             "(JSON has no comments, so they are described here):", ""]
    lines += [f"- `{Path(name).name}`: {comment}" for name, (comment, _) in EXAMPLES.items()
              if name.startswith("ds_configs/")]
    lines += ["", "`gradient_clipping` is 0: R2Gen clips gradient values (`clip_grad_value_` 0.1), which the",
              "adapter applies; DeepSpeed's setting clips the norm.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name in EXAMPLES:
        write_text(root / name, example_text(name))
        print(f"wrote {name}")
    write_text(root / "ds_configs" / "README.md", examples_readme())
    print("wrote ds_configs/README.md")
