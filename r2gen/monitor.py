"""What the host, the GPU and the process are doing, as metrics.jsonl keys (read every --log-every steps).

`system_metrics` reads psutil (host CPU, RAM, swap, this process's RSS), torch's allocator and, on a
GPU, NVML (utilization, memory, temperature, power, SM and memory clocks); a reading that fails
is left out rather than stopping the run. `data_wait_warning` is the rule for the loader warning.
"""

from __future__ import annotations

import functools
import os

import torch

GIB = 2**30
DATA_WAIT_WARN_PCT = 10.0


def system_metrics(device: torch.device) -> dict[str, float]:
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
def _nvml_handle(index: int):
    """NVML initialised once per process, not at every reading."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByIndex(index)


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
