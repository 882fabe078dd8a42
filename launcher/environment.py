"""`r2gen-launch env`: versions of what the launcher uses, and which engines and precisions run here.

`usable` is pure (hardware facts and the installed packages in, a verdict with its reason per
engine and precision out), the same rules the engines enforce when asked; `versions` reads the
installed distributions and runs `java -version`; `imagenet_weights` looks in torchvision's cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess

from backends.registry import SPECS
from launcher.hardware import Facts

PACKAGES = ("torch", "torchvision", "accelerate", "deepspeed", "transformer-engine", "torchao", "wandb",
            "tensorboard", "pycocoevalcap", "nvidia-ml-py")


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
    from r2gen.scores import java_available

    if not java_available():
        return None
    try:  # java_available is cached per process: PATH may have changed since
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (done.stderr or done.stdout).splitlines()
    return first[0].strip() if first else "present"


def usable(facts: Facts, installed: dict[str, bool]) -> dict[str, dict[str, str]]:
    """For each engine and precision: "yes", or why not, on this machine (the first GPU decides), from
    each engine's spec: its packages, devices, compute capability and GPU-only precisions."""
    gpu = facts.gpus[0] if facts.gpus else None
    bf16_gpu = gpu is not None and gpu.capability >= (8, 0)
    verdict: dict[str, dict[str, str]] = {}
    for engine in SPECS.values():
        verdict[engine.name] = {}
        missing = [module for module in engine.packages if not installed.get(module, False)]
        found = [label for module, label in engine.implementations.items() if installed.get(module)]
        least = engine.min_capability
        for precision in engine.precisions:
            if missing:
                why = f"{missing[0]} is not installed"
            elif engine.needs_gpu and gpu is None:
                why = "needs a CUDA GPU"
            elif least is not None and gpu is not None and gpu.capability < least:
                major, minor = gpu.capability
                why = f"needs compute capability {least[0]}.{least[1]}+ ({gpu.name} has {major}.{minor})"
            elif engine.implementations and not found:
                why = "needs " + " or ".join(module.replace("_", "-") for module in engine.implementations)
            elif precision in engine.gpu_only_precisions and gpu is None:
                why = f"{engine.title} runs {precision} on GPUs only"
            elif precision == "bf16" and gpu is not None and not bf16_gpu:
                why = f"{gpu.name} has no bfloat16 (compute capability below 8.0)"
            else:
                why = "yes" + (f" ({found[0]})" if found else "")
            verdict[engine.name][precision] = why
    return verdict


def imagenet_weights() -> dict[str, dict]:
    """For each preset's backbone (R2Gen's resnet101 first): where torchvision's cache keeps its ImageNet
    weights, and whether they are there (runs start from them; `weights import` puts them there)."""
    from r2gen.config import PRESETS
    from r2gen.model.visual_extractor import imagenet_cache_path

    backbones = dict.fromkeys(["resnet101", *(cfg.model.backbone for cfg in PRESETS.values())])
    return {name: {"path": str(imagenet_cache_path(name)), "present": imagenet_cache_path(name).is_file()}
            for name in backbones}


def installed_modules() -> dict[str, bool]:
    """Whether each module an engine needs (and wandb) can be imported here."""
    modules = [m for engine in SPECS.values() for m in (*engine.packages, *engine.implementations)] + ["wandb"]
    return {m: importlib.util.find_spec(m) is not None for m in dict.fromkeys(modules)}
