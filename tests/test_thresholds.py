"""Host rules: workers, pinning, cache and low-memory mode from plain host facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.hardware import HostFacts
from launcher.thresholds import Thresholds, decoded_size_gib, load_thresholds, plan_loader
from r2gen.errors import ConfigError

BIG = HostFacts(ram_total_gib=256, ram_available_gib=200, swap_total_gib=8, swap_used_gib=0, usable_cpus=32)
LAPTOP = HostFacts(ram_total_gib=16, ram_available_gib=7.5, swap_total_gib=4, swap_used_gib=0, usable_cpus=8)
# The reported server: host RAM at 94 % with swap in use, three GPUs.
STARVED = HostFacts(ram_total_gib=64, ram_available_gib=3.8, swap_total_gib=16, swap_used_gib=6, usable_cpus=24)
CI = HostFacts(ram_total_gib=24, ram_available_gib=22, swap_total_gib=0, swap_used_gib=0, usable_cpus=2)


def test_big_server_one_gpu() -> None:
    plan = plan_loader(BIG, Thresholds(), dataset_decoded_gib=1.0)
    assert plan.num_workers == 16 and "cap" in plan.reasons["num_workers"]
    assert plan.pin_memory and plan.cache_images and plan.persistent_workers and plan.prefetch_factor == 2
    assert not plan.low_memory


def test_workers_share_cpus_between_gpu_processes() -> None:
    plan = plan_loader(BIG, Thresholds(), dataset_decoded_gib=1.0, processes_per_host=4)
    assert plan.num_workers == 32 // 4 - 1


def test_laptop_is_limited_by_ram_and_does_not_pin() -> None:
    plan = plan_loader(LAPTOP, Thresholds(), dataset_decoded_gib=0.5)
    assert plan.num_workers == 5  # 7.5 GiB / 1.5 GiB per worker
    assert "RAM" in plan.reasons["num_workers"]
    assert not plan.pin_memory and "< 8.0 GiB" in plan.reasons["pin_memory"]


def test_starved_host_goes_low_memory() -> None:
    plan = plan_loader(STARVED, Thresholds(), dataset_decoded_gib=0.1, processes_per_host=3)
    assert plan.low_memory and plan.num_workers <= 1 and not plan.pin_memory and not plan.cache_images
    assert "swap" in plan.reasons["low_memory"]


def test_cpu_only_two_cores() -> None:
    plan = plan_loader(CI, Thresholds(), dataset_decoded_gib=0.05, uses_gpu=False)
    assert plan.num_workers == 1 and not plan.pin_memory and plan.reasons["pin_memory"] == "off: no GPU"


def test_cache_only_when_it_fits_the_share() -> None:
    t = Thresholds(cache_max_share_pct=10)
    assert plan_loader(BIG, t, dataset_decoded_gib=19.9).cache_images
    assert not plan_loader(BIG, t, dataset_decoded_gib=20.1).cache_images


def test_decoded_size() -> None:
    assert decoded_size_gib(2069 + 296 + 590, 2, 224) == pytest.approx(2955 * 2 * 3 * 256 * 256 / 2**30)


def test_yaml_overrides_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "t.yaml"
    good.write_text("ram_per_worker_gib: 3\nmax_workers: 4\n")
    assert load_thresholds(good) == Thresholds(ram_per_worker_gib=3, max_workers=4)
    assert load_thresholds(None) == Thresholds()
    cases = {"missing.yaml": None, "bad.yaml": "a: [1,\n", "list.yaml": "- 1\n",
             "unknown.yaml": "ram_per_worker: 2\n", "negative.yaml": "max_workers: -1\n",
             "util.yaml": "target_util_pct: 120\n", "text.yaml": "pin_min_free_gib: lots\n"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_thresholds(path)
        assert str(info.value).startswith("--thresholds:") and name in str(info.value), str(info.value)


@pytest.mark.parametrize("text,field", [
    ("max_workers: 2.5\n", "max_workers"),          # the reported case: accepted, then failed in the DataLoader
    ("max_workers: true\n", "max_workers"),         # a bool is not a count
    ("prefetch_factor: '2'\n", "prefetch_factor"),  # a string is not a number
    ("cpus_reserved: 1.0\n", "cpus_reserved"),
    ("useful_micro_batch: 0\n", "useful_micro_batch"),
    ("ram_per_worker_gib: 0\n", "ram_per_worker_gib"),
    ("cache_max_share_pct: 101\n", "cache_max_share_pct"),
    ("low_memory_available_pct: -1\n", "low_memory_available_pct"),
    ("target_util_pct: 0\n", "target_util_pct"),
    ("fp8_min_speedup_pct: .nan\n", "fp8_min_speedup_pct"),
    ("pin_min_free_gib: [8]\n", "pin_min_free_gib"),
])
def test_every_threshold_is_type_and_range_checked_on_load(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert message.startswith(f"--thresholds: {path}: {field}: ") and "\n" not in message, message


def test_a_whole_number_is_accepted_for_a_float_threshold(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("pin_min_free_gib: 4\ntarget_util_pct: 90\n")
    loaded = load_thresholds(path)
    assert loaded.pin_min_free_gib == 4.0 and isinstance(loaded.pin_min_free_gib, float)
    assert loaded.target_util_pct == 90.0


def test_thresholds_file_error_reaches_the_cli_as_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from launcher.cli import app

    path = tmp_path / "t.yaml"
    path.write_text("max_workers: 2.5\n")
    result = CliRunner().invoke(app, ["plain", "--device", "cpu", "--preset", "tiny", "--thresholds", str(path),
                                      "--run-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "max_workers" in lines[0] and str(path) in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()
