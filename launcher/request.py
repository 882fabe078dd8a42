"""A run request: what one training command asks for, resolved once from its flags, the user's engine file
(--ds-config, --accelerate-config) and the defaults (a flag, else the file, else the engine's default), as
one frozen value. launcher/cli.py builds it (`training_request`; `auto`'s own choices come from
launcher/auto.py); launcher/run.py's prepare, continue, start and launch read it and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

from backends.spec import EngineSpec, Topology
from launcher.plan import PlanOptions


@dataclass(frozen=True)
class DataPaths:
    """Where a run's data and starting weights come from (None: the embedded set; the defaults)."""

    ann_path: Optional[Path] = None
    image_dir: Optional[Path] = None
    visual_weights: Optional[Path] = None
    init_from: Optional[Path] = None   # a fine-tune's start: our checkpoint or run directory, or the published R2Gen's


@dataclass(frozen=True)
class UserEngineFile:
    """--ds-config / --accelerate-config: the file's settings, merged into the config the plan generates."""

    settings: Mapping[str, Any]
    path: Path


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class RunRequest:
    """Everything a training command asked for, decided. `engine` None is `auto`: it measures the plain
    engine first and may choose another (launcher.auto.auto_engine)."""

    engine: Optional[EngineSpec]
    device: str
    precision: str
    preset: str
    options: PlanOptions
    overrides: Mapping[str, Any] = field(default_factory=dict)        # TrainConfig fields set by flags (None: unset)
    engine_options: Mapping[str, Any] = field(default_factory=dict)   # the engine's own (zero, offload, fp8_impl)
    data: DataPaths = DataPaths()
    topology: Optional[Topology] = None     # None: --keep-training without --gpus/--nodes (the run's own)
    thresholds: Optional[Path] = None
    run_dir: Optional[Path] = Path("runs")  # None: plan only (`probe`), no run directory
    name: Optional[str] = None
    dry_run: bool = False
    keep_training: bool = False
    preset_given: Optional[str] = None      # --preset as typed (a continued run refuses another)
    hostfile: Optional[Path] = None
    user_file: Optional[UserEngineFile] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", _frozen(self.overrides))
        object.__setattr__(self, "engine_options", _frozen(self.engine_options))

    @property
    def engine_name(self) -> str:
        """The command's engine ("auto" for auto), as plans, run names and messages spell it."""
        return self.engine.name if self.engine is not None else "auto"

    @property
    def world_size(self) -> int:
        return (self.topology or Topology()).world_size


def default_precision(engine: EngineSpec, device: str) -> str:
    """The engine's own default (plain: fp32, as R2Gen; fp8: fp8; the others mixed precision on a GPU:
    bf16 where supported, else fp16)."""
    import torch

    return engine.default_precision(device, device == "cuda" and torch.cuda.is_bf16_supported())


def user_engine_file(flags: dict[str, Any]) -> tuple[Optional[UserEngineFile], dict[str, Any]]:
    """--ds-config / --accelerate-config (popped from the engine flags): the file, and the choices it makes
    for the flags left out (precision, --zero, --offload)."""
    from backends.registry import engine_files
    from launcher.engine_config import engine_file_choices, read_engine_file

    for file in engine_files():
        path = flags.pop(file.option, None)
        if path is not None:
            settings = read_engine_file(path, file.flag)
            return UserEngineFile(settings, path), engine_file_choices(settings, file.flag)
    return None, {}


def training_request(engine: EngineSpec, flags: dict[str, Any], *, device: Optional[str], precision: Optional[str],
                     preset: Optional[str], **asked: Any) -> RunRequest:
    """An engine command's request: `flags` are its engine flags as parsed (its options, its config file's
    flag, --hostfile; None where not given), each taken from the flag, else the user's engine file, else the
    engine's default; precision likewise; `asked` the request's other fields as given."""
    from launcher.hardware import default_device

    flags = dict(flags)
    hostfile = flags.pop("hostfile", None)
    user_file, file_choices = user_engine_file(flags)
    defaults = engine.option_defaults
    engine_options = {key: file_choices.get(key, defaults[key]) if flags[key] is None else flags[key]
                      for key in flags.keys() & defaults.keys()}
    device = default_device(device)
    precision = precision or file_choices.get("precision") or default_precision(engine, device)
    return RunRequest(engine, device, precision, preset or "iu_xray", engine_options=engine_options,
                      hostfile=hostfile, user_file=user_file, preset_given=preset, **asked)


def probe_request(backend: str, flags: dict[str, Any], *, device: Optional[str], precision: Optional[str],
                  preset: str, **asked: Any) -> RunRequest:
    """`probe`'s request: the engine --backend names (the one flag that names an engine), its options among
    `flags` (every engine's, with their defaults), its default precision, no run directory."""
    from backends.registry import spec
    from launcher.hardware import default_device

    engine = spec(backend)
    engine_options = engine.engine_options({k: v for k, v in flags.items() if k in engine.option_defaults})
    device = default_device(device)
    return RunRequest(engine, device, precision or default_precision(engine, device), preset,
                      engine_options=engine_options, run_dir=None, **asked)
