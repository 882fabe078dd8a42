"""The run request (launcher/request.py): a training command's flags, the user's engine file and the engine's
defaults resolved once, a flag first, else the file, else the default; frozen afterwards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from backends.registry import spec
from launcher.plan import PlanOptions
from launcher.request import RunRequest, UserEngineFile, training_request

DEEPSPEED_FLAGS = {"zero": None, "offload": None, "ds_config": None, "hostfile": None}  # as the command parses them


def _request(flags: dict, precision: str | None = None) -> RunRequest:
    return training_request(spec("deepspeed"), flags, device="cpu", precision=precision, preset=None,
                            options=PlanOptions())


def test_without_flags_or_file_the_engine_defaults_decide() -> None:
    request = _request(DEEPSPEED_FLAGS)
    assert dict(request.engine_options) == spec("deepspeed").option_defaults == {"zero": 2, "offload": "cpu"}
    assert request.precision == "fp32" and request.preset == "iu_xray" and request.preset_given is None
    assert request.engine is spec("deepspeed") and request.engine_name == "deepspeed" and request.user_file is None


def test_the_users_file_decides_the_flags_left_out_and_a_flag_wins(tmp_path: Path) -> None:
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 1, "offload_optimizer": {"device": "none"}}}))
    from_file = _request({**DEEPSPEED_FLAGS, "ds_config": own})
    assert dict(from_file.engine_options) == {"zero": 1, "offload": "none"} and from_file.precision == "bf16"
    assert from_file.user_file == UserEngineFile(from_file.user_file.settings, own)
    assert from_file.user_file.settings["zero_optimization"]["stage"] == 1
    flags_win = _request({**DEEPSPEED_FLAGS, "ds_config": own, "zero": 2, "offload": "cpu"}, precision="fp32")
    assert dict(flags_win.engine_options) == {"zero": 2, "offload": "cpu"} and flags_win.precision == "fp32"


def test_the_launchers_flag_is_kept_apart_from_the_engine_options(tmp_path: Path) -> None:
    request = _request({**DEEPSPEED_FLAGS, "hostfile": tmp_path / "hosts"})
    assert request.hostfile == tmp_path / "hosts" and "hostfile" not in request.engine_options


def test_a_request_is_frozen_with_its_mappings() -> None:
    request = _request(DEEPSPEED_FLAGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.precision = "bf16"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.engine_options["zero"] = 1  # type: ignore[index]
    auto = RunRequest(None, "cpu", "fp32", "tiny", PlanOptions(), overrides={"epochs": 2})
    assert auto.engine_name == "auto" and auto.world_size == 1
    with pytest.raises(TypeError):
        auto.overrides["epochs"] = 3  # type: ignore[index]


def test_probes_request_takes_its_engines_options_from_every_engines_flags() -> None:
    """`probe` has every engine's flags (with defaults); --backend picks the engine and its own options count."""
    from launcher.request import probe_request
    from r2gen.errors import BackendError

    flags = {"zero": 1, "offload": "none", "fp8_impl": "auto"}
    request = probe_request("deepspeed", flags, device="cpu", precision=None, preset="tiny", options=PlanOptions())
    assert request.engine is spec("deepspeed") and dict(request.engine_options) == {"zero": 1, "offload": "none"}
    assert (request.precision, request.preset, request.run_dir) == ("fp32", "tiny", None)
    assert dict(probe_request("plain", flags, device="cpu", precision="fp32", preset="tiny",
                              options=PlanOptions()).engine_options) == {}
    with pytest.raises(BackendError, match="--backend: unknown 'megatron'"):
        probe_request("megatron", flags, device="cpu", precision=None, preset="tiny", options=PlanOptions())
