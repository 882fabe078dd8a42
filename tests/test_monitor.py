"""Monitoring keys in metrics.jsonl (stable names), the data-wait warning rule, and the GPU readings
coming from the NVML device that is torch's (NVML ignores CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from r2gen import monitor
from r2gen.monitor import data_wait_warning, system_stats

NVML = ["GPU-8f2c1a3e-5b6d-4c7e-9f80-112233445566", "GPU-8f2c9b07-aa11-4b22-8c33-d4e5f6a7b8c9",
        "GPU-1d4e7a90-0b1c-4d2e-8f3a-4b5c6d7e8f90", "GPU-c0ffee00-1234-4567-89ab-cdef01234567"]


def test_cpu_readings_have_the_stable_keys() -> None:
    record = system_stats(torch.device("cpu"))
    assert {"system/cpu_pct", "system/ram_used_gib", "system/ram_available_gib", "system/swap_used_gib",
            "system/process_rss_gib"} <= set(record)
    assert record["system/process_rss_gib"] > 0 and not any(k.startswith("gpu/") for k in record)


def test_data_wait_warning_names_the_fix() -> None:
    assert data_wait_warning(9.9, 2) is None
    warning = data_wait_warning(23.0, 2)
    assert warning is not None and "23%" in warning and "--num-workers" in warning and "(now 2)" in warning


@pytest.fixture
def four_gpu_nvml(monkeypatch: pytest.MonkeyPatch):
    """A fake pynvml over four GPUs (handle = NVML's index; GPU i has 10*(i+1) GiB, i*10 % busy), counting nvmlInit.

    Yields a function setting torch's devices (their UUIDs); the monitor's once-per-process cache is cleared."""
    inits = []

    class NVMLError(Exception):
        pass

    fake = SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=lambda: inits.append(1), nvmlDeviceGetCount=lambda: 4, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: NVML[h].encode(),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=h * 10),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=2**30, total=10 * (h + 1) * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 50 + h, nvmlDeviceGetPowerUsage=lambda h: 100_000,
        nvmlDeviceGetClockInfo=lambda h, clock: 1000 + clock)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def torch_devices(*uuids: str | None) -> list:
        props = [SimpleNamespace(uuid=u) for u in uuids]
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
        return inits

    monitor._nvml_handles.cache_clear()
    yield torch_devices
    monitor._nvml_handles.cache_clear()


def test_gpu_readings_come_from_torchs_gpu_not_nvmls_same_index(four_gpu_nvml, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    inits = four_gpu_nvml(NVML[3].removeprefix("GPU-"), NVML[1].removeprefix("GPU-"))
    first, second = monitor._nvml(0), monitor._nvml(1)
    assert first["gpu/memory_total_gib"] == 40.0 and first["gpu/util_pct"] == 30.0  # cuda:0 is NVML's GPU 3
    assert second["gpu/memory_total_gib"] == 20.0 and second["gpu/temperature_c"] == 51.0
    assert {"gpu/power_w", "gpu/sm_clock_mhz", "gpu/memory_clock_mhz", "gpu/memory_used_gib"} <= set(first)
    monitor._nvml(0)
    assert inits == [1]  # NVML initialised and the devices matched once per process


def test_gpu_readings_without_torch_uuid_follow_cuda_visible_devices(four_gpu_nvml, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1d4e")
    four_gpu_nvml(None)
    assert monitor._nvml(0)["gpu/memory_total_gib"] == 30.0


def test_no_nvml_match_leaves_the_gpu_keys_out(four_gpu_nvml) -> None:
    four_gpu_nvml("4b5c6d7e-8f90-5a1b-9c2d-3e4f5a6b7c8d")  # a MIG instance's UUID: no whole GPU has it
    assert monitor._nvml(0) == {} and monitor._nvml(1) == {}


def test_failing_nvml_leaves_the_gpu_keys_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monitor._nvml_handles.cache_clear()
    try:
        assert monitor._nvml(0) == {}
    finally:
        monitor._nvml_handles.cache_clear()
