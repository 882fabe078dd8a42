"""detect() on this machine: host facts are real numbers; without a GPU it says so instead of failing.

Pairing torch's devices with NVML's (NVML ignores CUDA_VISIBLE_DEVICES): the pure rule on plain
values, and detect() on a fake NVML and fake torch devices.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from launcher.hardware import detect
from r2gen.gpu_map import nvml_indices_for_torch

# NVML's four GPUs, in NVML's (PCI bus) order; two share the prefix '8f2c'.
NVML = ["GPU-8f2c1a3e-5b6d-4c7e-9f80-112233445566", "GPU-8f2c9b07-aa11-4b22-8c33-d4e5f6a7b8c9",
        "GPU-1d4e7a90-0b1c-4d2e-8f3a-4b5c6d7e8f90", "GPU-c0ffee00-1234-4567-89ab-cdef01234567"]
BARE = [u.removeprefix("GPU-") for u in NVML]  # what str(torch.cuda.get_device_properties(i).uuid) gives


def test_detect_reports_host_and_gpus() -> None:
    facts = detect()
    host = facts.host
    assert host.ram_total_gib > 0 and 0 < host.ram_available_gib <= host.ram_total_gib
    assert host.usable_cpus >= 1 and host.swap_used_gib >= 0
    if torch.cuda.is_available():
        assert facts.gpus and all(g.total_gib > 0 and g.capability[0] >= 3 for g in facts.gpus)
    else:
        assert facts.gpus == () and "CPU only" in facts.gpu_note
    assert facts.to_dict()["host"]["usable_cpus"] == host.usable_cpus


def test_one_visible_gpu_is_nvmls_gpu_3_by_uuid() -> None:
    mapping = nvml_indices_for_torch([BARE[3]], NVML, "3")
    assert mapping.indices == [3] and mapping.how == "by UUID"
    # UUID wins over whatever CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER say (FASTEST_FIRST may reorder).
    assert nvml_indices_for_torch([BARE[2], BARE[0]], NVML, "0,2", "FASTEST_FIRST").indices == [2, 0]


def test_torch_uuid_with_or_without_gpu_prefix_and_any_case() -> None:
    forms = [BARE[2], NVML[2], NVML[2].upper(), "gpu-" + BARE[2].upper(), f" {BARE[2]} "]
    assert nvml_indices_for_torch(forms, NVML, None).indices == [2] * len(forms)


def test_unset_visible_devices() -> None:
    assert nvml_indices_for_torch(BARE[::-1], NVML, None).indices == [3, 2, 1, 0]
    mapping = nvml_indices_for_torch([None] * 4, NVML, None)
    assert mapping.indices == [0, 1, 2, 3] and "no UUID" in mapping.how and "PCI_BUS_ID" in mapping.how


def test_without_torch_uuids_visible_indices_give_the_order() -> None:
    mapping = nvml_indices_for_torch([None], NVML, "3")
    assert mapping.indices == [3] and "CUDA_VISIBLE_DEVICES='3'" in mapping.how
    mapping = nvml_indices_for_torch([None, None], NVML, "2,0")
    assert mapping.indices == [2, 0] and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in mapping.how  # FASTEST_FIRST: a guess
    mapping = nvml_indices_for_torch(["", None], NVML, " 2, 0", "PCI_BUS_ID")
    assert mapping.indices == [2, 0] and "PCI_BUS_ID" not in mapping.how


def test_without_torch_uuids_visible_uuids_and_prefixes() -> None:
    assert nvml_indices_for_torch([None, None], NVML, f"{NVML[3]},{NVML[1]}").indices == [3, 1]
    assert nvml_indices_for_torch([None, None, None], NVML, "GPU-1d4e,GPU-8f2c9,gpu-C0FFEE").indices == [2, 1, 3]
    # 'GPU-8f2c' is two GPUs' prefix: ambiguous, so it ends the list as CUDA does.
    assert nvml_indices_for_torch([None, None], NVML, "GPU-c0ff,GPU-8f2c").indices == [3, None]


def test_an_invalid_entry_ends_the_list() -> None:
    assert nvml_indices_for_torch([None] * 3, NVML, "1,x,2").indices == [1, None, None]
    assert nvml_indices_for_torch([None] * 3, NVML, "3,7,0").indices == [3, None, None]  # no GPU 7
    assert nvml_indices_for_torch([None] * 2, NVML, "2,-1").indices == [2, None]
    assert nvml_indices_for_torch([None] * 2, NVML, "1gpu,3").indices == [1, 3]  # strtoul: '1gpu' is 1
    assert nvml_indices_for_torch([None] * 2, NVML, f"{NVML[0]},2").indices == [0, None]  # one kind per list
    assert nvml_indices_for_torch([None] * 2, NVML, "1,1").indices == [None, None]  # repeated: none visible
    mapping = nvml_indices_for_torch([None] * 2, NVML, "GPU-deadbeef,0")
    assert mapping.indices == [None, None] and "no NVML GPU matches cuda:0, cuda:1" in mapping.how


def test_mig_instances_match_no_nvml_gpu() -> None:
    mig = "MIG-4b5c6d7e-8f90-5a1b-9c2d-3e4f5a6b7c8d"
    assert nvml_indices_for_torch([None], NVML, mig).indices == [None]
    mapping = nvml_indices_for_torch([mig.removeprefix("MIG-"), BARE[1]], NVML, f"{mig},{NVML[1]}")
    assert mapping.indices == [None, 1] and "cuda:0" in mapping.how


def _fake_nvml(totals_gib: list[float]) -> SimpleNamespace:
    """pynvml over len(totals_gib) GPUs (handle = NVML's index, UUIDs NVML[:n]); GPU i has totals_gib[i] GiB."""
    gib = 2**30

    class NVMLError(Exception):
        pass

    def no_processes(handle: int) -> list:
        raise NVMLError("no per-process view")

    return SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(totals_gib), nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: NVML[h], nvmlDeviceGetName=lambda h: f"GPU{h}".encode(),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0), nvmlDeviceGetComputeRunningProcesses=no_processes,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=totals_gib[h] * gib, free=totals_gib[h] * gib / 2,
                                                          used=totals_gib[h] * gib / 2))


def _fake_torch_devices(monkeypatch: pytest.MonkeyPatch, uuids: list[str | None]) -> None:
    props = [SimpleNamespace(uuid=u, name=f"torch{i}", major=8, minor=0) for i, u in enumerate(uuids)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (1 * 2**30, 2 * 2**30))


def test_detect_lists_torchs_gpus_with_the_matching_nvml_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([10.0, 20.0, 30.0, 40.0]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1,MIG-4b5c6d7e-8f90-5a1b-9c2d-3e4f5a6b7c8d")
    _fake_torch_devices(monkeypatch, [BARE[3], BARE[1], "4b5c6d7e-8f90-5a1b-9c2d-3e4f5a6b7c8d"])
    facts = detect()
    assert [g.index for g in facts.gpus] == [0, 1, 2]
    assert [g.total_gib for g in facts.gpus] == [40.0, 20.0, 2.0]  # cuda:2 has no NVML match: torch's facts
    assert [g.name for g in facts.gpus] == ["GPU3", "GPU1", "torch2"]
    assert facts.gpus[0].used_by_others_gib == 20.0  # no per-process view: all used memory
    assert "3 GPU(s) via NVML" in facts.gpu_note and "cuda:0 = NVML GPU 3" in facts.gpu_note
    assert "cuda:2 via torch" in facts.gpu_note


def test_detect_falls_back_to_torch_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ModuleNotFoundError
    _fake_torch_devices(monkeypatch, [BARE[0]])
    facts = detect()
    assert [(g.index, g.total_gib) for g in facts.gpus] == [(0, 2.0)]
    assert facts.gpu_note == "NVML unavailable (ModuleNotFoundError); 1 GPU(s) via torch"
