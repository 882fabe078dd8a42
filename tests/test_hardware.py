"""detect() on this machine: host facts are real numbers; without a GPU it says so instead of failing."""

from __future__ import annotations

import torch

from launcher.hardware import detect


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
