"""Facts about this machine: GPUs (pynvml, else torch) and host memory/CPUs (psutil).

`detect()` is the only function here with side effects; the dataclasses are plain values the
planner reads, so tests build them by hand. torch's devices are paired with NVML's by UUID
(r2gen.gpu_map, shared with the training loop's GPU monitor).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from r2gen.gpu_map import map_torch_to_nvml, nvml_text
from r2gen.units import GIB


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


def default_device(device: str | None) -> str:
    """--device, else a GPU where one is visible, else the CPU: every command's one rule."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _host() -> HostFacts:
    import psutil

    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return HostFacts(vm.total / GIB, vm.available / GIB, swap.total / GIB, swap.used / GIB, cpus)


def _gpu_nvml(handle, index: int) -> GpuFacts:
    import pynvml

    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml_text(pynvml.nvmlDeviceGetName(handle))
    cap = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    others = 0
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        own_pid = os.getpid()
        others = sum((p.usedGpuMemory or 0) for p in procs if p.pid != own_pid)
    except pynvml.NVMLError:
        others = mem.used  # no per-process view (containers): count all used memory
    return GpuFacts(index, name, (int(cap[0]), int(cap[1])), mem.total / GIB, mem.free / GIB, others / GIB)


def _gpus_nvml() -> tuple[tuple[GpuFacts, ...], str]:
    """torch's GPUs in torch's order (index = torch's), each read from the NVML device it is; and the note.

    A device NVML has no match for (a MIG instance) gets torch's facts."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        mapping = map_torch_to_nvml(handles)
        gpus = tuple(_gpu_torch(t) if n is None else _gpu_nvml(handles[n], t) for t, n in enumerate(mapping.indices))
        pairs = ", ".join(f"cuda:{t} via torch" if n is None else f"cuda:{t} = NVML GPU {n}"
                          for t, n in enumerate(mapping.indices))
        return gpus, f"{len(gpus)} GPU(s) via NVML ({pairs}; matched {mapping.how})"
    finally:
        pynvml.nvmlShutdown()


def _gpu_torch(index: int) -> GpuFacts:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    props = torch.cuda.get_device_properties(index)
    return GpuFacts(index, props.name, (props.major, props.minor), total / GIB, free / GIB, (total - free) / GIB)


def _gpus_torch() -> tuple[GpuFacts, ...]:
    import torch

    return tuple(_gpu_torch(i) for i in range(torch.cuda.device_count()))


def detect() -> Facts:
    """Look at this machine. Never raises for a missing GPU or driver: it says so in gpu_note.

    `gpus` are the GPUs torch sees, in torch's order (index = torch's cuda index), each with the
    facts of the NVML device it is (matched by UUID); torch's facts only where NVML is missing or broken.
    """
    import torch

    host = _host()
    if not torch.cuda.is_available():
        return Facts((), host, "no CUDA GPU visible to torch: CPU only")
    try:
        gpus, note = _gpus_nvml()
    except Exception as err:  # noqa: BLE001 - NVML missing or broken: torch still knows the basics
        gpus = _gpus_torch()
        return Facts(gpus, host, f"NVML unavailable ({type(err).__name__}); {len(gpus)} GPU(s) via torch")
    return Facts(gpus, host, note)
