"""What the host, the GPU and the process are doing, as metrics.jsonl keys (read every --log-every steps).

`system_stats` reads psutil (host CPU, RAM, swap, this process's RSS), torch's allocator and, on a
GPU, NVML (utilization, memory, temperature, power, SM and memory clocks) of the NVML device that is
torch's (matched by UUID once per process: NVML ignores CUDA_VISIBLE_DEVICES); a reading that fails,
or a device NVML has no match for, is left out rather than stopping the run. `data_wait_warning` is
the rule for the loader warning.
"""

from __future__ import annotations

import functools
import os

import torch

from r2gen.units import GIB

DATA_WAIT_WARN_PCT = 10.0


def system_stats(device: torch.device) -> dict[str, float]:
    import psutil

    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    record = {"system/cpu_pct": psutil.cpu_percent(interval=None), "system/ram_used_gib": (vm.total - vm.available) / GIB,
              "system/ram_available_gib": vm.available / GIB, "system/swap_used_gib": swap.used / GIB,
              "system/process_rss_gib": psutil.Process(os.getpid()).memory_info().rss / GIB}
    if device.type == "cuda":
        record.update({"memory/allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                       "memory/reserved_gib": torch.cuda.memory_reserved(device) / GIB,
                       "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB})
        record.update(_nvml(device.index if device.index is not None else torch.cuda.current_device()))
    return record


@functools.cache
def _nvml_handles() -> tuple:
    """NVML's handle of each of torch's devices (None: no match), found once per process; () if NVML fails.

    NVML ignores CUDA_VISIBLE_DEVICES (with CUDA_VISIBLE_DEVICES=3 torch's cuda:0 is NVML's GPU 3), so
    the devices are paired by UUID, as the launcher's hardware facts pair them. NVML stays initialised.
    """
    try:
        import pynvml

        from r2gen.gpu_map import map_torch_to_nvml

        pynvml.nvmlInit()
        nvml = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return tuple(None if n is None else nvml[n] for n in map_torch_to_nvml(nvml).indices)
    except Exception:  # noqa: BLE001 - no NVML: the readings are left out
        return ()


def _nvml_handle(index: int):
    """NVML's handle of torch's cuda:`index`; LookupError when NVML failed or has no such GPU."""
    handles = _nvml_handles()
    if index >= len(handles) or handles[index] is None:
        raise LookupError(f"no NVML device for cuda:{index}")
    return handles[index]


def _nvml(index: int) -> dict[str, float]:
    try:
        import pynvml

        handle = _nvml_handle(index)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"gpu/util_pct": float(util.gpu), "gpu/memory_used_gib": memory.used / GIB,
                "gpu/memory_total_gib": memory.total / GIB,
                "gpu/temperature_c": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
                "gpu/power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                "gpu/sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                "gpu/memory_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))}
    except Exception:  # noqa: BLE001 - NVML missing or refusing must not stop training
        return {}


def data_wait_warning(wait_pct: float, num_workers: int) -> str | None:
    """The warning (naming the fix) when the step waited on the loader for more than 10% of its time."""
    if wait_pct <= DATA_WAIT_WARN_PCT:
        return None
    return (f"{wait_pct:.0f}% of step time waiting for data (> {DATA_WAIT_WARN_PCT:g}%): raise --num-workers "
            f"(now {num_workers}) or cache the decoded images (more free RAM, or a smaller --image-size)")
