"""Facts about this machine: GPUs (pynvml, else torch) and host memory/CPUs (psutil).

`detect()` is the only function here with side effects; the dataclasses are plain values the
planner reads, so tests build them by hand.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass(frozen=True)
class GpuFacts:
    index: int
    name: str
    capability: tuple[int, int]       # CUDA compute capability (major, minor)
    total_gib: float
    free_gib: float
    used_by_others_gib: float         # memory held by other processes when we looked


@dataclass(frozen=True)
class HostFacts:
    ram_total_gib: float
    ram_available_gib: float
    swap_total_gib: float
    swap_used_gib: float
    usable_cpus: int                  # CPUs this process may run on (affinity), not the machine's count


@dataclass(frozen=True)
class Facts:
    gpus: tuple[GpuFacts, ...]
    host: HostFacts
    gpu_note: str                     # how the GPUs were found, or why none were

    def to_dict(self) -> dict:
        return asdict(self)


def _host() -> HostFacts:
    import psutil

    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return HostFacts(vm.total / GIB, vm.available / GIB, swap.total / GIB, swap.used / GIB, cpus)


def _gpus_nvml() -> tuple[GpuFacts, ...]:
    import pynvml

    pynvml.nvmlInit()
    try:
        own_pid = os.getpid()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            cap = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            others = 0
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                others = sum((p.usedGpuMemory or 0) for p in procs if p.pid != own_pid)
            except pynvml.NVMLError:
                others = mem.used  # no per-process view (containers): count all used memory
            gpus.append(GpuFacts(i, name, (int(cap[0]), int(cap[1])), mem.total / GIB, mem.free / GIB, others / GIB))
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def _gpus_torch() -> tuple[GpuFacts, ...]:
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        gpus.append(GpuFacts(i, props.name, (props.major, props.minor), total / GIB, free / GIB,
                             (total - free) / GIB))
    return tuple(gpus)


def detect() -> Facts:
    """Look at this machine. Never raises for a missing GPU or driver: it says so in gpu_note."""
    import torch

    host = _host()
    if not torch.cuda.is_available():
        return Facts((), host, "no CUDA GPU visible to torch: CPU only")
    try:
        gpus = _gpus_nvml()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None or len(gpus) == torch.cuda.device_count():
            return Facts(gpus, host, f"{len(gpus)} GPU(s) via NVML")
    except Exception as err:  # noqa: BLE001 - NVML missing or broken: torch still knows the basics
        note = f"NVML unavailable ({type(err).__name__}); "
    else:
        note = "CUDA_VISIBLE_DEVICES limits the GPUs; "
    gpus = _gpus_torch()
    return Facts(gpus, host, f"{note}{len(gpus)} GPU(s) via torch")
