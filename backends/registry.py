"""The engines: name -> EngineSpec (backends/spec.py), the one place the CLI, the probe and the worker
build a backend or ask what an engine needs. A new engine is one file in backends/ (ending with its
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
    found = {s.file.flag: s.file for s in SPECS.values() if s.file is not None}
    if flag not in found:
        raise ConfigError(f"{flag}: no engine reads such a file (choose one of {', '.join(found)})")
    return found[flag]


def build_backend(name: str, device: str, precision: str, options: Mapping[str, Any] | None = None) -> Backend:
    """A validated adapter; `options` are the engine's (a plan's engine: defaults for the rest). Raises
    BackendError (exit 2) for requests this machine cannot serve."""
    return spec(name).build(device, precision, options)
