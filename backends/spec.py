"""What the launcher asks an engine, answered in one place: the engine's `EngineSpec`.

Each engine's file in backends/ ends with its SPEC (devices, precisions and defaults, typed
options, packages, its launch command, its config file, the hook that hands the adapter that
file); backends.registry lists them. Launcher code asks the spec instead of branching on an
engine's name. The builders take plain values (`Topology`, `ConfigInputs`): backends imports
nothing from launcher.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from backends.base import Backend
from r2gen.errors import ConfigError


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


@dataclass(frozen=True)
class ConfigInputs:
    """The plain values an engine's config file is generated from (launcher.engine_config takes them
    from a Plan and a Topology; the probe and the benches give their own)."""

    device: str
    precision: str
    options: Mapping[str, Any] = field(default_factory=dict)  # the engine's options (EngineSpec.engine_options)
    micro_batch: int = 1
    accumulation: int = 1
    world_size: int = 1               # processes the batch is split over (the plan's)
    pin_memory: bool = False
    topology: Topology = Topology()   # the processes the launcher starts


def option(default: Any, help: str) -> Any:
    """A field of an engine's typed options with its command-line help (`--<name>` with dashes): the
    CLI builds the engine's flags from these (launcher.options.engine_parameters)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LaunchOption:
    """A flag for the engine's launcher, not for the plan (DeepSpeed's --hostfile): a path or nothing."""

    name: str       # its keyword among the command's options: "hostfile"
    help: str
    shown: str      # what the help page says is used without it


LaunchBuilder = Callable[[Topology, str, Sequence[str], "Path | None", "Path | None"], list]
"""(topology, worker module, worker arguments, engine config file, hostfile) -> the command line."""


def get_dotted(data: object, dotted: str) -> object:
    """data["a"]["b"] for "a.b"; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


@dataclass(frozen=True)
class EngineFile:
    """An engine's own config file: generated from the plan, optionally started from the user's."""

    name: str                               # in the run directory: "ds_config.json"
    flag: str                               # the user's own file: "--ds-config"
    option: str                             # that flag's keyword among the command's options: "ds_config"
    format: str                             # "json" or "yaml"
    build: Callable[[ConfigInputs], dict]   # the generated mapping
    planned: Mapping[str, str]              # fields the plan decides (dotted paths) -> the flag that sets them
    choices: Callable[[dict], dict]         # what a user's file says about the flags left out (precision, options)
    refused: Mapping[str, str] = field(default_factory=dict)  # fields not accepted in a user's file -> why
    help: str = ""                          # the flag's help (the user's own file to start from)

    def text(self, config: dict, run_name: str) -> str:
        """The file as written into the run directory (YAML with a line saying where it came from)."""
        if self.format == "json":
            return json.dumps(config, indent=2, sort_keys=True) + "\n"
        import yaml

        return (f"# written by r2gen-launch for run {run_name}: the plan's values (with your {self.flag}'s)\n"
                + yaml.safe_dump(config, sort_keys=True))

    def parse(self, text: str) -> object:
        """The file's data (safe loaders: nothing in it runs); raises ValueError or yaml.YAMLError."""
        if self.format == "json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)


@dataclass(frozen=True)
class EngineSpec:
    """One engine, as the launcher sees it. The adapter class (backends/<engine>.py) is what the loop
    drives; this is everything decided or generated before the loop starts."""

    name: str                                # command and plan name: "deepspeed"
    title: str                               # in sentences: "DeepSpeed"
    summary: str                             # its training command's help line (`r2gen-launch <name> --help`)
    adapter: Callable[[str, str, dict], Backend]  # (device, precision, engine options) -> the validated adapter
    devices: tuple[str, ...]                 # ("cuda", "cpu"), or ("cuda",) for an engine that needs a GPU
    precisions: tuple[str, ...]              # the precisions it trains in (env's table)
    default_precisions: Mapping[str, str]    # device -> precision without --precision (bf16: fp16 where none)
    launch: LaunchBuilder                    # the engine's own launcher for several processes
    gpu_only_precisions: tuple[str, ...] = ()  # accepted on a GPU only (Accelerate's, DeepSpeed's fp16)
    one_cpu_process: str = ""                # why it runs one process only on a CPU; "": any number
    options: type | None = None              # typed options: a frozen dataclass (name, default), validated
    packages: tuple[str, ...] = ()           # modules it needs, all of them
    implementations: Mapping[str, str] = field(default_factory=dict)  # module -> label: one needed, first preferred
    min_capability: tuple[int, int] | None = None  # CUDA compute capability it needs
    file: EngineFile | None = None           # its config file; None: it reads none
    launch_options: tuple[LaunchOption, ...] = ()  # flags for its launcher (not plan options)
    options_note: Callable[[Mapping[str, Any]], str] | None = None  # what its options mean for the plan's reasons
    on_configure: Callable[[Backend, dict], None] | None = None  # hands the adapter its config before prepare()

    # -- devices and precisions ------------------------------------------------------------------------
    @property
    def needs_gpu(self) -> bool:
        return "cpu" not in self.devices

    @property
    def several_cpu_processes(self) -> bool:
        return not self.one_cpu_process

    def default_precision(self, device: str, bf16_supported: bool) -> str:
        """The precision without --precision on `device`; `bf16_supported`: the GPU has bfloat16
        (torch.cuda.is_bf16_supported()), else a GPU default of bf16 becomes fp16. A device the
        engine does not serve gets its first precision: the device checks refuse it with their reason."""
        precision = self.default_precisions.get(device, self.precisions[0])
        return "fp16" if precision == "bf16" and device == "cuda" and not bf16_supported else precision

    # -- options ---------------------------------------------------------------------------------------
    @property
    def option_defaults(self) -> dict[str, Any]:
        """Each engine option's name and default ({} for an engine without options)."""
        return {} if self.options is None else {f.name: f.default for f in fields(self.options)}

    def engine_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The engine's options: `given` (a plan's engine, a command's flags; None means not given),
        the defaults for the rest, validated by the typed options (BackendError/ConfigError)."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.option_defaults))
        if unknown:
            raise ConfigError(f"{self.name}: no engine option {', '.join(unknown)}"
                              + (f" (it has {', '.join(self.option_defaults)})" if self.option_defaults else ""))
        return {} if self.options is None else asdict(self.options(**given))

    def note(self, options: Mapping[str, Any]) -> str:
        """What the plan should say about these options (its "engine" reason), "" where nothing."""
        return self.options_note(options) if self.options_note is not None else ""

    def build(self, device: str, precision: str, options: Mapping[str, Any] | None = None) -> Backend:
        """The validated adapter; raises BackendError (exit 2) for what this machine cannot serve."""
        return self.adapter(device, precision, self.engine_options(options))

    # -- launching, config file -------------------------------------------------------------------------
    def launch_command(self, topology: Topology, module: str, worker_args: Sequence[str],
                       engine_file: Path | None = None, hostfile: Path | None = None) -> list[str]:
        """The command line that starts `topology.world_size` processes of `python -m module worker_args`."""
        return self.launch(topology, module, worker_args, engine_file, hostfile)

    def generate_config(self, inputs: ConfigInputs) -> dict | None:
        """The engine's config mapping from plain values; None for an engine without a file."""
        return None if self.file is None else self.file.build(inputs)

    @property
    def reads_config(self) -> bool:
        """Whether the adapter takes its config file before prepare() (`configure`)."""
        return self.on_configure is not None

    def configure(self, adapter: Backend, config: dict | None) -> None:
        """Hand `adapter` the run's generated config before prepare() (DeepSpeed's JSON); a no-op for
        an engine whose adapter reads none."""
        if self.on_configure is None:
            return
        if config is None:
            raise ConfigError(f"{self.name}: no engine config; the launcher generates one from the plan")
        self.on_configure(adapter, config)
