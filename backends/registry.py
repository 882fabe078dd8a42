"""The engines: name -> EngineSpec (backends/spec.py), the one place the CLI, the probe and the worker
build a backend or ask what an engine needs. A new engine is one file in backends/ and one line here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backends.accelerate import SPEC as ACCELERATE
from backends.base import Backend
from backends.deepspeed import SPEC as DEEPSPEED
from backends.fp8 import SPEC as FP8
from backends.plain import SPEC as PLAIN
from backends.spec import EngineFile, EngineSpec
from r2gen.errors import BackendError, ConfigError

SPECS: dict[str, EngineSpec] = {s.name: s for s in (PLAIN, ACCELERATE, DEEPSPEED, FP8)}
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
