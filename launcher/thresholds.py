"""Host-side thresholds: one typed table of documented defaults (types and ranges checked by pydantic
on construction), overridable from a YAML file, and the pure rules that turn host facts into
data-loader settings, each with the reason a user reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from launcher.hardware import HostFacts
from r2gen.errors import ConfigError


_STRICT = ConfigDict(strict=True, extra="forbid")  # 2.5 is not a worker count, nor "lots" a GiB


@pydantic_dataclass(frozen=True, config=_STRICT)
class Thresholds:
    """Defaults for the host rules; every field can be set in a YAML file (--thresholds FILE).
    Types and ranges are checked on construction: a bad value fails here, naming its field, not
    later inside the DataLoader."""

    ram_per_worker_gib: Annotated[float, Field(gt=0)] = 1.5         # host RAM one loader worker needs
    cpus_reserved: Annotated[int, Field(ge=0)] = 1                  # CPUs left for the training process, per GPU process
    max_workers: Annotated[int, Field(ge=1)] = 16                   # beyond this, more workers rarely help one GPU
    pin_min_free_gib: Annotated[float, Field(ge=0)] = 8.0           # pinned buffers only with this much RAM available
    cache_max_share_pct: Annotated[float, Field(ge=0, le=100)] = 25.0  # cache decoded images within this share of RAM
    low_memory_available_pct: Annotated[float, Field(ge=0, le=100)] = 15.0  # below this share available: low-memory mode
    low_memory_swap_gib: Annotated[float, Field(ge=0)] = 1.0        # swap in use above this: low-memory mode
    prefetch_factor: Annotated[int, Field(ge=1)] = 2                # batches each worker prepares ahead
    target_util_pct: Annotated[float, Field(gt=0, le=100)] = 85.0   # share of a GPU's memory the probe plans to use
    useful_micro_batch: Annotated[int, Field(ge=1)] = 8             # auto: below this micro-batch, try ZeRO-2 CPU offload
    fp8_min_speedup_pct: Annotated[float, Field(ge=0)] = 5.0        # auto: FP8 only when this much faster than bf16
    min_steps_per_epoch: Annotated[int, Field(ge=1)] = 32           # auto: a batch larger than the preset's only while an epoch keeps this many optimizer steps
    max_warmup_steps: Annotated[int, Field(ge=0)] = 200             # learning-rate warm-up after a scaled-up rate: one epoch's steps, at most this many
    autotune_below_micro_batch: Annotated[int, Field(ge=0)] = 48    # GPU: cuDNN autotuning only below this micro-batch (0: never)

    def to_dict(self) -> dict:
        return asdict(self)


def _first_error(err: ValidationError) -> str:
    """'max_workers: input should be a valid integer, got 2.5' from pydantic's first error."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "value"
    message = first["msg"][:1].lower() + first["msg"][1:]
    return f"{field}: {message}, got {first['input']!r}"


def load_thresholds(path: Path | None) -> Thresholds:
    """Defaults, with the fields a YAML mapping sets replaced. Unknown keys are errors."""
    if path is None:
        return Thresholds()
    import yaml

    if not path.is_file():
        raise ConfigError(f"--thresholds: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"--thresholds: {path} is not valid YAML ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--thresholds: {path} must hold a mapping of threshold names to numbers")
    known = {f.name for f in fields(Thresholds)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"--thresholds: {path}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return Thresholds(**data)
    except ValidationError as err:
        raise ConfigError(f"--thresholds: {path}: {_first_error(err)}") from None


@dataclass(frozen=True)
class LoaderPlan:
    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    cache_images: bool
    low_memory: bool
    reasons: dict[str, str]


def plan_loader(host: HostFacts, t: Thresholds, dataset_decoded_gib: float, processes_per_host: int = 1,
                uses_gpu: bool = True) -> LoaderPlan:
    """num_workers, pinning, worker persistence, prefetch and image cache for one training process."""
    reasons: dict[str, str] = {}
    avail_pct = 100.0 * host.ram_available_gib / max(host.ram_total_gib, 1e-9)
    low = avail_pct < t.low_memory_available_pct or host.swap_used_gib > t.low_memory_swap_gib
    if low:
        why = (f"{host.swap_used_gib:.1f} GiB swap in use" if host.swap_used_gib > t.low_memory_swap_gib
               else f"only {avail_pct:.0f}% of RAM available")
        reasons["low_memory"] = f"on: {why} (thresholds {t.low_memory_available_pct:.0f}% / {t.low_memory_swap_gib} GiB swap)"
    else:
        reasons["low_memory"] = f"off: {avail_pct:.0f}% of RAM available, {host.swap_used_gib:.1f} GiB swap in use"

    cpus_each = max(host.usable_cpus // max(processes_per_host, 1) - t.cpus_reserved, 0)
    ram_each = host.ram_available_gib / max(processes_per_host, 1)
    by_ram = int(ram_each // t.ram_per_worker_gib)
    workers = min(cpus_each, by_ram, t.max_workers)
    if low:
        workers = min(workers, 1)
    limit = min((("CPUs", cpus_each), ("RAM", by_ram), ("cap", t.max_workers)), key=lambda kv: kv[1])[0]
    reasons["num_workers"] = (f"{workers}: {host.usable_cpus} usable CPUs / {processes_per_host} process(es) minus "
                              f"{t.cpus_reserved} reserved = {cpus_each}; {ram_each:.1f} GiB RAM / "
                              f"{t.ram_per_worker_gib} GiB per worker = {by_ram}; cap {t.max_workers}"
                              + ("; low-memory mode allows 1" if low else f"; limited by {limit}"))

    pin = uses_gpu and not low and host.ram_available_gib >= t.pin_min_free_gib
    reasons["pin_memory"] = ("off: no GPU" if not uses_gpu else
                             "off: low-memory mode" if low else
                             f"{'on' if pin else 'off'}: {host.ram_available_gib:.1f} GiB available "
                             f"({'>=' if pin else '<'} {t.pin_min_free_gib} GiB)")

    cache_cap = ram_each * t.cache_max_share_pct / 100.0
    cache = not low and dataset_decoded_gib <= cache_cap
    reasons["cache_images"] = ("off: low-memory mode" if low else
                               f"{'on' if cache else 'off'}: decoded images {dataset_decoded_gib:.2f} GiB "
                               f"{'<=' if cache else '>'} {t.cache_max_share_pct:.0f}% of {ram_each:.1f} GiB")
    prefetch = t.prefetch_factor if workers > 0 else None
    reasons["persistent_workers"] = "on: workers survive between epochs" if workers else "off: no workers"
    return LoaderPlan(workers, pin, workers > 0, prefetch, cache, low, reasons)


def decoded_size_gib(studies: int, views: int, image_size: int, channels: int = 3) -> float:
    """Bytes of the cached, decoded, resized uint8 images of a data set."""
    side = math.ceil(image_size * 256 / 224)  # the cache holds images before the random crop
    return studies * views * channels * side * side / 2**30
