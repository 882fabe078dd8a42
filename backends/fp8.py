"""FP8 training: eligible Linear layers of the encoder-decoder compute in float8, the rest in bf16.

Two implementations, one rule for which layers convert (`eligible_linears`: every nn.Linear of the
encoder-decoder whose input and output sizes are multiples of 16, as float8 GEMMs need; the
ResNet's convolutions and the vocabulary-sized logit layer stay bf16):
- Transformer Engine where it is installed: the layers become te.Linear (weights copied) and the
  forward runs under te.fp8_autocast with a DelayedScaling recipe in the HYBRID format (E4M3
  forward, E5M2 gradients).
- torchao float8 training where it is not: the layers become Float8Linear (dynamic tensorwise
  scaling, the same Parameter objects), with the GEMM's inner dimension padded to 16 because the
  number of tokens in a batch varies.
Everything else is the plain adapter under bf16 autocast (data parallel under torchrun included). The model
code knows nothing of this: conversion is a function applied from outside. Its SPEC is at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from backends.plain import PlainBackend, torchrun_command
from backends.spec import EngineSpec, option
from r2gen.errors import BackendError, ConfigError

FP8_IMPLS = ("auto", "te", "torchao")
MIN_CAPABILITY = (8, 9)
"""float8 tensor cores: Ada (8.9), Hopper (9.0) and newer."""


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_fp8_impl(requested: str) -> str:
    """--fp8-impl: auto picks Transformer Engine where installed, else torchao."""
    if requested not in FP8_IMPLS:
        raise ConfigError(f"--fp8-impl: unknown {requested!r}; choose one of {', '.join(FP8_IMPLS)}")
    te, ao = installed("transformer_engine"), installed("torchao")
    if requested == "te" and not te:
        raise BackendError("--fp8-impl te: transformer-engine is not installed (pip install transformer-engine[pytorch]) "
                           "; or use --fp8-impl torchao")
    if requested == "torchao" and not ao:
        raise BackendError("--fp8-impl torchao: torchao is not installed (pip install torchao)")
    if requested == "auto":
        if not (te or ao):
            raise BackendError("--precision fp8: neither transformer-engine nor torchao is installed "
                               "(pip install torchao)")
        return "te" if te else "torchao"
    return requested


def check_fp8_device(device: torch.device) -> None:
    """FP8 GEMMs need a CUDA GPU of compute capability 8.9 or newer."""
    if device.type != "cuda":
        raise BackendError("fp8: needs a CUDA GPU of compute capability 8.9+ (Ada, Hopper or newer); "
                           "this run is on the CPU (use plain or accelerate)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise BackendError(f"fp8: {torch.cuda.get_device_name(device)} has compute capability "
                           f"{capability[0]}.{capability[1]}; FP8 needs 8.9+ (Ada, Hopper or newer); use bf16")


def eligible_linears(model: nn.Module) -> list[str]:
    """Names (in model.named_modules()) of the encoder-decoder's Linear layers FP8 can run."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and name.startswith("encoder_decoder.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0]


def swapped_linears(model: nn.Module, names: list[str]) -> list[str]:
    """Which of the named layers are no longer plain nn.Linear (what a conversion really swapped)."""
    return [name for name in names if type(model.get_submodule(name)) is not nn.Linear]


def convert_to_fp8(model: nn.Module, impl: str, emulate: bool = False) -> list[str]:
    """Swap the eligible Linear layers in place; returns the names of those really swapped (none swapped
    is a BackendError: a run labelled fp8 must not train in bf16). `emulate` (torchao only) runs the
    float8 arithmetic without float8 hardware (tests on CPU)."""
    names = eligible_linears(model)
    if impl == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        wanted = set(names)
        convert_to_float8_training(model, config=Float8LinearConfig(pad_inner_dim=True, emulate=emulate),
                                   module_filter_fn=lambda _module, fqn: fqn in wanted)
        return _checked(model, names, "torchao's convert_to_float8_training")
    if impl == "te":
        import transformer_engine.pytorch as te

        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old: nn.Linear = getattr(parent, child)
            new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                            params_dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            setattr(parent, child, new)
        return _checked(model, names, "Transformer Engine's Linear")
    raise ConfigError(f"--fp8-impl: unknown {impl!r}")


def _checked(model: nn.Module, names: list[str], how: str) -> list[str]:
    swapped = swapped_linears(model, names)
    if not swapped:
        raise BackendError(f"fp8: {how} swapped none of the {len(names)} eligible Linear layers (an API change?); "
                           "this run would train in bf16 under an fp8 label: use --precision bf16, or another "
                           "--fp8-impl")
    return swapped


class Fp8Backend(PlainBackend):
    """The plain adapter (bf16 autocast, data parallel under torchrun) with FP8 Linear layers."""

    name = "fp8"
    cuda_graphs = False  # its swapped Linear layers are not captured

    def __init__(self, device: str = "cuda", precision: str = "fp8", fp8_impl: str = "auto"):
        if precision != "fp8":
            raise BackendError(f"--precision {precision}: the fp8 backend trains in fp8 (with bf16 convolutions); "
                               "for other precisions use plain, accelerate or deepspeed")
        super().__init__(device, "bf16")
        check_fp8_device(self.device)
        self.precision = "fp8"
        self.impl = resolve_fp8_impl(fp8_impl)
        self.converted: list[str] = []
        self._recipe = None
        if self.impl == "te":
            from transformer_engine.common.recipe import DelayedScaling, Format

            self._recipe = DelayedScaling(fp8_format=Format.HYBRID)

    def prepare(self, model, make_optimizer):
        self.converted = convert_to_fp8(model, self.impl)  # before the optimizer: te.Linear has new parameters
        return super().prepare(model, make_optimizer)

    def autocast(self) -> AbstractContextManager:
        bf16 = torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.impl != "te":
            return bf16  # Float8Linear casts to float8 itself
        import transformer_engine.pytorch as te

        stack = contextlib.ExitStack()
        stack.enter_context(bf16)
        stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self._recipe))
        return stack

    def describe(self) -> str:
        impl = "Transformer Engine" if self.impl == "te" else "torchao float8"
        return (f"fp8 ({impl}: {len(self.converted) or 'eligible'} Linear layers in float8, the rest bf16) "
                f"on {self.device}" + (f", {self.world_size} processes" if self.world_size > 1 else ""))


# -- the spec --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Options:
    """`r2gen-launch fp8` engine options."""

    fp8_impl: str = option("auto", "auto: Transformer Engine where installed, else torchao float8; te; torchao.")

    def __post_init__(self) -> None:
        if self.fp8_impl not in FP8_IMPLS:
            raise ConfigError(f"--fp8-impl: unknown {self.fp8_impl!r}; choose one of {', '.join(FP8_IMPLS)}")


SPEC = EngineSpec(
    name="fp8",
    summary=("Train and evaluate R2Gen with FP8 Linear layers in the encoder-decoder (Transformer Engine where "
            "installed, else torchao float8; convolutions bf16), from a probed plan; GPUs of compute capability "
            "8.9+ only."),
    title="FP8",
    adapter=lambda device, precision, options: Fp8Backend(device, precision, options["fp8_impl"]),
    devices=("cuda",), precisions=("fp8",),
    default_precisions={"cuda": "fp8", "cpu": "fp8"},  # on a CPU refused with its reason (needs_gpu)
    options=Fp8Options,
    implementations={"transformer_engine": "Transformer Engine", "torchao": "torchao"},  # auto's order
    min_capability=MIN_CAPABILITY,
    launch=torchrun_command,  # the plain adapter's data parallel under torchrun
)
