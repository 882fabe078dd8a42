"""Monitoring keys in metrics.jsonl (stable names), and the data-wait warning rule."""

from __future__ import annotations

import torch

from r2gen.monitor import data_wait_warning, system_metrics


def test_cpu_readings_have_the_stable_keys() -> None:
    record = system_metrics(torch.device("cpu"))
    assert {"system/cpu_pct", "system/ram_used_gib", "system/ram_available_gib", "system/swap_used_gib",
            "system/process_rss_gib"} <= set(record)
    assert record["system/process_rss_gib"] > 0 and not any(k.startswith("gpu/") for k in record)


def test_data_wait_warning_names_the_fix() -> None:
    assert data_wait_warning(9.9, 2) is None
    warning = data_wait_warning(23.0, 2)
    assert warning is not None and "23%" in warning and "--num-workers" in warning and "(now 2)" in warning
