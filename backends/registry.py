"""Backend names to adapters: the one place the CLI, the probe and the worker build a backend."""

from __future__ import annotations

from backends.base import Backend
from r2gen.errors import BackendError

BACKENDS = ("plain", "accelerate", "deepspeed", "fp8")


def build_backend(name: str, device: str, precision: str, fp8_impl: str = "auto") -> Backend:
    """A validated adapter; raises BackendError (exit 2) for requests this machine cannot serve."""
    if name == "plain":
        from backends.plain import PlainBackend

        return PlainBackend(device, precision)
    if name == "accelerate":
        from backends.accelerate import AccelerateBackend

        return AccelerateBackend(device, precision)
    if name == "deepspeed":
        from backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(device, precision)
    if name == "fp8":
        from backends.fp8 import Fp8Backend

        return Fp8Backend(device, precision, fp8_impl)
    raise BackendError(f"--backend: unknown {name!r}; choose one of {', '.join(BACKENDS)}")
