"""Generated engine configs are accepted by the engines' own loaders and agree with the plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataclasses import replace

from backends.deepspeed import DeepSpeedOptions
from backends.spec import Topology
from launcher.engine_config import (engine_config_for, engine_file_choices, generated_config, read_engine_file,
                                    stored_engine_file, write_engine_config)
from launcher.hardware import HostFacts
from launcher.plan import Plan, plan_batch
from launcher.thresholds import Thresholds, plan_loader
from r2gen.errors import BackendError, ConfigError


def _plan(precision: str = "bf16", largest: int = 6, world: int = 1, device: str = "cuda") -> Plan:
    return Plan("deepspeed", device, precision, plan_batch(largest, world, "faithful", 16, "sqrt", 5e-5, 1e-4),
                plan_loader(HostFacts(64, 40, 0, 0, 16), Thresholds(), 1.0, world, device == "cuda"), 68.0, 10.0,
                {"backend": "test"})


@pytest.mark.parametrize("precision,zero,offload,world", [("bf16", 2, "cpu", 1), ("fp16", 2, "none", 1),
                                                          ("bf16", 1, "none", 2), ("fp16", 2, "cpu", 2),
                                                          ("fp32", 2, "none", 1)])
def test_deepspeed_accepts_the_generated_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str,
                                              zero: int, offload: str, world: int) -> None:
    import deepspeed.runtime.config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # The parser checks train_batch_size against the process group's size: answer as rank 0 of `world`.
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world)

    plan = replace(_plan(precision, largest=6, world=world), engine={"zero": zero, "offload": offload})
    engine = engine_config_for(plan, Topology(gpus_per_node=world), tmp_path / "run1")
    path = write_engine_config(engine)
    assert path == tmp_path / "run1" / "ds_config.json"  # with the run, wherever the user stands
    parsed = DeepSpeedConfig(str(path))
    b = plan.batch
    assert parsed.train_batch_size == b.micro_batch * b.accumulation * world == b.effective_batch
    assert parsed.train_micro_batch_size_per_gpu == b.micro_batch
    assert parsed.gradient_accumulation_steps == b.accumulation
    assert parsed.zero_optimization_stage == zero
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.zero_config.offload_optimizer is None if offload == "none" else \
        parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.gradient_clipping == 0.0  # R2Gen clips values, in the adapter
    assert not list(path.parent.glob("*.tmp"))


def test_deepspeed_refusals() -> None:
    with pytest.raises(BackendError, match="--zero 3"):
        DeepSpeedOptions(zero=3)
    with pytest.raises(ConfigError, match="--zero"):
        DeepSpeedOptions(zero=4)
    with pytest.raises(ConfigError, match="--offload"):
        DeepSpeedOptions(offload="nvme")
    with pytest.raises(BackendError, match="--precision fp8"):
        generated_config(_plan("fp8"), Topology())


@pytest.mark.parametrize("precision,gpus,nodes", [("bf16", 1, 1), ("fp16", 2, 1), ("fp32", 4, 2)])
def test_accelerate_loads_the_generated_yaml(tmp_path: Path, precision: str, gpus: int, nodes: int) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    topology = Topology(gpus_per_node=gpus, nodes=nodes, node_rank=nodes - 1, master_addr="10.0.0.1",
                        master_port=29512)
    plan = replace(_plan(precision), backend="accelerate")
    path = write_engine_config(engine_config_for(plan, topology, tmp_path / "r"))
    assert path == tmp_path / "r" / "accelerate_config.yaml"
    assert engine_config_for(replace(plan, backend="plain"), topology, tmp_path / "r") is None
    loaded = load_config_from_file(str(path))
    assert str(loaded.mixed_precision.value if hasattr(loaded.mixed_precision, "value") else loaded.mixed_precision) \
        == {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]
    assert loaded.num_processes == gpus * nodes and loaded.num_machines == nodes
    assert loaded.machine_rank == nodes - 1
    assert str(getattr(loaded.distributed_type, "value", loaded.distributed_type)) == \
        ("MULTI_GPU" if gpus * nodes > 1 else "NO")
    if nodes > 1:
        assert loaded.main_process_ip == "10.0.0.1" and loaded.main_process_port == 29512
    assert path.read_text().startswith("# written by r2gen-launch")


@pytest.mark.parametrize("kwargs,flag", [({"gpus_per_node": 0}, "--gpus"), ({"nodes": 0}, "--nodes"),
                                         ({"nodes": 2, "node_rank": 2}, "--node-rank"),
                                         ({"master_port": 70000}, "--master-port"), ({"master_addr": ""}, "--master-addr")])
def test_topology_is_validated(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        Topology(**kwargs)


@pytest.mark.parametrize("name", sorted(__import__("launcher.engine_config", fromlist=["EXAMPLES"]).EXAMPLES))
def test_checked_in_examples_are_current_and_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples in the repository are exactly what the generator writes, and the engines load them."""
    from launcher.engine_config import example_text, examples_readme

    root = Path(__file__).resolve().parents[1]
    assert (root / name).read_text() == example_text(name), "regenerate: python -m launcher.engine_config"
    assert (root / "ds_configs" / "README.md").read_text() == examples_readme()
    if name.endswith(".json"):
        import json

        import deepspeed.runtime.config as ds_config

        data = json.loads((root / name).read_text())
        world = data["train_batch_size"] // (data["train_micro_batch_size_per_gpu"] * data["gradient_accumulation_steps"])
        monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world)
        ds_config.DeepSpeedConfig(str(root / name))
    else:
        from accelerate.commands.config.config_args import load_config_from_file

        load_config_from_file(str(root / name))


# -- the user's own engine file -----------------------------------------------------------------------

def _user_file(tmp_path: Path, data: dict, name: str = "mine.json") -> tuple[dict, Path]:
    import json

    import yaml

    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return read_engine_file(path, "--ds-config" if name.endswith(".json") else "--accelerate-config"), path


def test_own_deepspeed_json_is_merged_with_the_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.runtime.config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 1)
    plan = replace(_plan("bf16", largest=6), engine={"zero": 2, "offload": "none"})
    b = plan.batch
    user, path = _user_file(tmp_path, {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": b.micro_batch,
                                       "bf16": {"enabled": True}, "zero_optimization": {
                                           "stage": 2, "reduce_bucket_size": 5e7, "round_robin_gradients": True},
                                       "steps_per_print": 50, "wall_clock_breakdown": True})
    engine = engine_config_for(plan, Topology(), tmp_path / "run", user, path)
    config = engine.config
    assert config["train_batch_size"] == b.effective_batch  # "auto": the plan's
    assert config["zero_optimization"]["reduce_bucket_size"] == 5e7  # the user's own settings kept
    assert config["zero_optimization"]["round_robin_gradients"] is True
    assert config["zero_optimization"]["overlap_comm"] is True  # the plan's, where the user said nothing
    assert config["steps_per_print"] == 50 and config["wall_clock_breakdown"] is True
    DeepSpeedConfig(str(write_engine_config(engine)))  # DeepSpeed's own parser accepts the merge
    assert engine.path == tmp_path / "run" / "ds_config.json"


@pytest.mark.parametrize("data,field", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 64}, "train_batch_size"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param"),
])
def test_own_deepspeed_json_that_disagrees_is_refused_naming_the_field(tmp_path: Path, data: dict,
                                                                       field: str) -> None:
    plan = replace(_plan("bf16", largest=6), engine={"zero": 2, "offload": "none"})
    user, path = _user_file(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        engine_config_for(plan, Topology(), tmp_path / "run", user, path)
    message = str(info.value)
    assert message.startswith(f"--ds-config: {path}: {field}") and "\n" not in message, message
    assert not (tmp_path / "run").exists()


def test_own_accelerate_yaml_is_merged_or_refused(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    plan = replace(_plan("bf16"), backend="accelerate")
    topology = Topology(gpus_per_node=2, master_port=29555)
    user, path = _user_file(tmp_path, {"mixed_precision": "bf16", "gpu_ids": "0,1", "num_processes": 2,
                                       "dynamo_config": {"dynamo_backend": "NO"}}, "mine.yaml")
    engine = engine_config_for(plan, topology, tmp_path / "run", user, path)
    assert engine.config["gpu_ids"] == "0,1" and engine.config["num_processes"] == 2
    loaded = load_config_from_file(str(write_engine_config(engine)))
    assert loaded.num_processes == 2 and loaded.gpu_ids == "0,1"
    for data, field in (({"mixed_precision": "fp16"}, "mixed_precision"), ({"num_processes": 8}, "num_processes"),
                        ({"use_cpu": True}, "use_cpu"), ({"distributed_type": "DEEPSPEED"}, "distributed_type")):
        user, path = _user_file(tmp_path, data, "bad.yaml")
        with pytest.raises(ConfigError, match=f"^--accelerate-config: {path}: {field} is "):
            engine_config_for(plan, topology, tmp_path / "run2", user, path)


@pytest.mark.parametrize("text,needle", [(None, "does not exist"), ("{not json", "is not valid JSON"),
                                         ("[1, 2]", "must hold a mapping")])
def test_unreadable_own_engine_file_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "x.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=f"^--ds-config: {path} {needle}"):
        read_engine_file(path, "--ds-config")


def test_own_file_choices_fill_the_flags_left_out(tmp_path: Path) -> None:
    user, _ = _user_file(tmp_path, {"fp16": {"enabled": True}, "zero_optimization": {
        "stage": 1, "offload_optimizer": {"device": "none"}}})
    assert engine_file_choices(user, "--ds-config") == {"precision": "fp16", "zero": 1, "offload": "none"}
    assert engine_file_choices({"mixed_precision": "no"}, "--accelerate-config") == {"precision": "fp32"}


def test_continued_run_keeps_the_users_settings_and_replans_the_batch(tmp_path: Path) -> None:
    plan = replace(_plan("bf16", largest=6), engine={"zero": 2, "offload": "none"})
    user, path = _user_file(tmp_path, {"steps_per_print": 7, "train_micro_batch_size_per_gpu": plan.batch.micro_batch})
    write_engine_config(engine_config_for(plan, Topology(), tmp_path / "run", user, path))
    smaller = replace(plan, batch=replace(plan.batch, micro_batch=3, accumulation=6))  # re-planned on resume
    again = engine_config_for(smaller, Topology(), tmp_path / "run", stored_engine_file(smaller, tmp_path / "run"))
    assert again.config["steps_per_print"] == 7 and again.config["train_micro_batch_size_per_gpu"] == 3
