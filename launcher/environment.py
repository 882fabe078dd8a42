"""`r2gen-launch env`: versions of what the launcher uses, and which engines and precisions run here.

`usable` is pure (hardware facts and the installed packages in, a verdict with its reason per
engine and precision out), the same rules the engines enforce when asked; `versions` reads the
installed distributions and runs `java -version`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess

from backends.fp8 import MIN_CAPABILITY
from launcher.hardware import Facts
from launcher.plan import GPU_ENGINES

PACKAGES = ("torch", "torchvision", "accelerate", "deepspeed", "transformer-engine", "torchao", "wandb",
            "pycocoevalcap", "nvidia-ml-py")
ENGINE_PRECISIONS = {"plain": ("fp32", "bf16", "fp16"), "accelerate": ("fp32", "bf16", "fp16"),
                     "deepspeed": ("fp32", "bf16", "fp16"), "fp8": ("fp8",)}


def own_version() -> str:
    """This package's installed version."""
    try:
        return importlib.metadata.version("r2gen-launch")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def versions() -> dict[str, str | None]:
    """Installed version of each package (None: not installed), CUDA and cuDNN as torch sees them,
    and Java's (METEOR needs it)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    import torch

    found["torch"] = torch.__version__  # with its build tag (+cu130, +cpu)
    found["cuda (torch)"] = torch.version.cuda
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    found["java"] = _java_version()
    return found


def _java_version() -> str | None:
    from r2gen.metrics import java_available

    if not java_available():
        return None
    try:  # java_available is cached per process: PATH may have changed since
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (done.stderr or done.stdout).splitlines()
    return first[0].strip() if first else "present"


def usable(facts: Facts, installed: dict[str, bool]) -> dict[str, dict[str, str]]:
    """For each engine and precision: "yes", or why not, on this machine (the first GPU decides)."""
    gpu = facts.gpus[0] if facts.gpus else None
    bf16_gpu = gpu is not None and gpu.capability >= (8, 0)
    verdict: dict[str, dict[str, str]] = {}
    for engine, precisions in ENGINE_PRECISIONS.items():
        verdict[engine] = {}
        for precision in precisions:
            if engine in ("accelerate", "deepspeed") and not installed.get(engine, False):
                why = f"{engine} is not installed"
            elif engine in GPU_ENGINES and gpu is None:
                why = "needs a CUDA GPU"
            elif engine == "fp8" and gpu.capability < MIN_CAPABILITY:
                why = f"needs compute capability 8.9+ ({gpu.name} has {gpu.capability[0]}.{gpu.capability[1]})"
            elif engine == "fp8" and not (installed.get("transformer_engine") or installed.get("torchao")):
                why = "needs transformer-engine or torchao"
            elif precision == "fp16" and gpu is None and engine == "accelerate":
                why = "Accelerate runs fp16 on GPUs only"
            elif precision == "bf16" and gpu is not None and not bf16_gpu:
                why = f"{gpu.name} has no bfloat16 (compute capability below 8.0)"
            else:
                why = "yes" + (f" ({'Transformer Engine' if installed.get('transformer_engine') else 'torchao'})"
                               if engine == "fp8" else "")
            verdict[engine][precision] = why
    return verdict


def installed_modules() -> dict[str, bool]:
    return {m: importlib.util.find_spec(m) is not None
            for m in ("accelerate", "deepspeed", "transformer_engine", "torchao", "wandb")}
