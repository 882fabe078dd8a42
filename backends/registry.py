"""The engines: name -> EngineSpec (backends/spec.py), the one place an engine is found by its name (the
CLI's commands come from SPECS; a stored plan, launch file or probe request names its engine and asks here
through its `spec` property). A new engine is one file in backends/ (ending with its
SPEC) and one name in ENGINES; the CLI's training commands come from here."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from backends.base import Backend
from backends.spec import EngineFile, EngineSpec
from r2gen.errors import BackendError, ConfigError

ENGINES = (
    "plain",
    "accelerate",
    "deepspeed",
    "fp8",
)
"""backends/<name>.py for each engine, in the order commands and tables list them."""


def _load(name: str) -> EngineSpec:
    found = importlib.import_module(f"backends.{name}").SPEC
    if found.name != name:
        raise ImportError(f"backends/{name}.py's SPEC is named {found.name!r}, not {name!r}")
    return found


SPECS: dict[str, EngineSpec] = {name: _load(name) for name in ENGINES}
BACKENDS = tuple(SPECS)


def spec(name: str) -> EngineSpec:
    """The engine called `name`; BackendError (exit 2) for an unknown one."""
    if name not in SPECS:
        raise BackendError(f"--backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
    return SPECS[name]


def engine_file(flag: str) -> EngineFile:
    """The config file a user's flag (--ds-config, --accelerate-config) gives."""
    found = {file.flag: file for file in engine_files()}
    if flag not in found:
        raise ConfigError(f"{flag}: no engine reads such a file (choose one of {', '.join(found)})")
    return found[flag]


def build_backend(name: str, device: str, precision: str, options: Mapping[str, Any] | None = None) -> Backend:
    """A validated adapter; `options` are the engine's (a plan's engine: defaults for the rest). Raises
    BackendError (exit 2) for requests this machine cannot serve."""
    return spec(name).build(device, precision, options)


def engine_files() -> tuple[EngineFile, ...]:
    """Every engine's own config file (DeepSpeed's JSON, Accelerate's YAML), in registry order."""
    return tuple(s.file for s in SPECS.values() if s.file is not None)


def check_engine_device(engine: EngineSpec, device: str, processes: int = 1) -> None:
    """Refuse what an engine cannot serve on this device: exit 2 before any work (its spec says what it
    serves; the message names the engines that would)."""
    if engine.needs_gpu and device != "cuda":
        on_cpu = " or ".join(s.name for s in SPECS.values() if not s.needs_gpu)
        raise BackendError(f"{engine.name}: needs a CUDA GPU, and this run would be on the CPU (no GPU visible, or "
                           f"--device cpu); on a CPU train with {on_cpu}")
    if not engine.several_cpu_processes and device != "cuda" and processes > 1:
        several = " or ".join(s.name for s in SPECS.values() if not s.needs_gpu and s.several_cpu_processes)
        raise BackendError(f"--gpus {processes}: {engine.one_cpu_process}; use {several} --gpus N for gloo "
                           "processes on a CPU")
