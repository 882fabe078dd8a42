"""`r2gen-launch env`: what runs where (pure rules), and the command itself on this machine."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from launcher.cli import app
from launcher.environment import usable
from launcher.hardware import Facts, GpuFacts, HostFacts

HOST = HostFacts(64, 60, 0, 0, 16)
ALL = {"accelerate": True, "deepspeed": True, "transformer_engine": False, "torchao": True, "wandb": True}


def _facts(*gpus: GpuFacts) -> Facts:
    return Facts(gpus, HOST, "test")


def test_an_h100_runs_everything_and_fp8_through_torchao() -> None:
    verdict = usable(_facts(GpuFacts(0, "NVIDIA H100 80GB HBM3", (9, 0), 79.2, 78.0, 0.0)), ALL)
    assert all(v.startswith("yes") for engine in verdict.values() for v in engine.values())
    assert verdict["fp8"]["fp8"] == "yes (torchao)"


def test_a_v100_has_no_bf16_and_no_fp8() -> None:
    verdict = usable(_facts(GpuFacts(0, "Tesla V100-SXM2-16GB", (7, 0), 15.8, 15.0, 0.0)), ALL)
    assert "no bfloat16" in verdict["plain"]["bf16"] and verdict["plain"]["fp16"] == "yes"
    assert "8.9+" in verdict["fp8"]["fp8"] and verdict["deepspeed"]["fp16"] == "yes"


def test_a_cpu_runs_plain_and_accelerate_only() -> None:
    verdict = usable(_facts(), {**ALL, "torchao": False})
    assert verdict["plain"] == {"fp32": "yes", "bf16": "yes", "fp16": "yes"}
    assert verdict["accelerate"]["fp16"] == "Accelerate runs fp16 on GPUs only"
    assert verdict["deepspeed"]["bf16"] == verdict["fp8"]["fp8"] == "needs a CUDA GPU"
    assert usable(_facts(), {**ALL, "deepspeed": False})["deepspeed"]["bf16"] == "deepspeed is not installed"


def test_env_command_prints_versions_and_writes_json(tmp_path: Path) -> None:
    import torch

    result = CliRunner().invoke(app, ["env", "--json", str(tmp_path / "env.json")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert torch.__version__ in result.output and "engines and precisions usable here" in result.output
    data = json.loads((tmp_path / "env.json").read_text())
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["usable"]) == {"plain", "accelerate", "deepspeed", "fp8"} and data["machine"]["host"]["usable_cpus"] >= 1
