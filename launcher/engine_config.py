"""Engine configs generated from the Plan (DeepSpeed JSON, Accelerate YAML), as plain dicts.

Pure: the values follow from the plan (train_batch_size = micro x accumulation x world size, the
precision, the loader's pinning) and from the engine options; the engine's spec (backends/, its
EngineFile) builds the mapping from those plain values and names its file, its user flag and the
fields the plan decides. A user's own file (--ds-config, --accelerate-config) adds its other
settings, and a field the plan decides must agree with it: that merge is here, for every engine.
`engine_config_for` places the run's file in its run directory (`<run>/ds_config.json`,
`<run>/accelerate_config.yaml`: reproducible, and found again by --keep-training) and
`write_engine_config` writes it atomically. Each dict is what the engine's own loader accepts (tested against DeepSpeed's DeepSpeedConfig and accelerate's
load_config_from_file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from backends.registry import engine_file
from backends.spec import ConfigInputs, Topology, get_dotted
from launcher.plan import Plan
from r2gen.atomic import write_text
from r2gen.errors import ConfigError


def config_inputs(plan: Plan, topology: Topology) -> ConfigInputs:
    """The plain values an engine's config is built from: the plan's, and the processes launched."""
    b = plan.batch
    return ConfigInputs(plan.device, plan.precision, plan.spec.engine_options(plan.engine), b.micro_batch,
                        b.accumulation, b.world_size, plan.loader.pin_memory, topology)


def generated_config(plan: Plan, topology: Topology) -> dict | None:
    """The engine's config mapping for the plan and its processes (DeepSpeed's JSON, Accelerate's
    YAML keys); None for an engine that reads none."""
    return plan.spec.generate_config(config_inputs(plan, topology))


@dataclass(frozen=True)
class EngineConfig:
    """A run's engine config: the mapping, where it goes (in the run directory), and the file's text."""

    config: dict
    path: Path
    text: str


# -- a user's own engine file: fields the plan decides must agree, the rest is theirs -------------------

AUTO = "auto"  # DeepSpeed's and the HF integration's word for "let the launcher decide"


def read_engine_file(path: Path, flag: str) -> dict:
    """A user's DeepSpeed JSON or accelerate YAML, as data (safe loaders: nothing in it runs)."""
    import yaml

    file = engine_file(flag)
    if not path.is_file():
        raise ConfigError(f"{flag}: {path} does not exist")
    try:
        data = file.parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag}: {path} is not valid {file.format.upper()} ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path} must hold a mapping of settings")
    return data


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):  # an empty section sets nothing
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def merge_engine_file(generated: dict, user: dict, planned: dict[str, str], refused: dict[str, str],
                      flag: str, path: Path) -> dict:
    """The generated config with the user's settings added. A planned field the user set to another
    value than the plan's (other than "auto") is a ConfigError naming the field, both values and
    the flag that sets it; a refused field is one too."""
    leaves = _leaves(user)
    for dotted in leaves:
        for field, why in refused.items():
            if dotted == field or dotted.startswith(field + "."):
                raise ConfigError(f"{flag}: {path}: {field}: not accepted ({why}); remove it")
    merged = json.loads(json.dumps(generated))
    for dotted, value in leaves.items():
        if value == AUTO:
            continue
        covered = next((f for f in planned if dotted == f or f.startswith(dotted + ".")), None)
        if covered is not None:
            wanted = get_dotted(generated, dotted)
            if value != wanted:
                raise ConfigError(f"{flag}: {path}: {dotted} is {value!r}, the plan's is {wanted!r}; set it with "
                                  f"{planned[covered]}, or write \"auto\" (or leave it out) to take the plan's")
            continue
        _set(merged, dotted, value)
    return merged


def engine_file_choices(user: dict, flag: str) -> dict:
    """What a user's file says about the choices its flags make, for the flags the user left out:
    precision, and DeepSpeed's zero and offload."""
    return engine_file(flag).choices(user)


def without_planned(config: dict, planned: dict[str, str]) -> dict:
    """A run's own engine file with the plan's fields taken out (--keep-training re-plans them)."""
    kept = json.loads(json.dumps(config))
    for dotted in planned:
        *parents, last = dotted.split(".")
        parent = get_dotted(kept, ".".join(parents)) if parents else kept
        if isinstance(parent, dict):
            parent.pop(last, None)
    return kept


def engine_config_for(plan: Plan, topology: Topology, run_dir: Path, user: dict | None = None,
                      user_path: Path | None = None) -> EngineConfig | None:
    """The engine's file in the run directory (`<run>/ds_config.json`, `<run>/accelerate_config.yaml`:
    the plan's values, merged with `user`, the user's own file, where given); None for an engine
    without one (plain, fp8)."""
    file = plan.spec.file
    if file is None:
        return None
    config = generated_config(plan, topology)
    if user is not None:
        config = merge_engine_file(config, user, dict(file.planned), dict(file.refused), file.flag,
                                   user_path or run_dir / file.name)
    return EngineConfig(config, run_dir / file.name, file.text(config, run_dir.name))


def stored_engine_file(plan: Plan, run_dir: Path) -> dict | None:
    """--keep-training: the run's own engine file (the user's settings in it), without the plan's fields."""
    file = plan.spec.file
    if file is None or not (run_dir / file.name).is_file():
        return None
    return without_planned(read_engine_file(run_dir / file.name, file.flag), dict(file.planned))


def write_engine_config(engine: EngineConfig) -> Path:
    write_text(engine.path, engine.text)
    return engine.path


# -- checked-in examples (regenerate with `python -m launcher.engine_config`) ---------------------------

def _example_plan(backend: str, precision: str, largest: int, world: int, policy: str, engine: dict) -> Plan:
    from launcher.hardware import HostFacts
    from launcher.plan import plan_batch
    from launcher.thresholds import Thresholds, plan_loader

    host = HostFacts(ram_total_gib=64, ram_available_gib=48, swap_total_gib=0, swap_used_gib=0, usable_cpus=16)
    return Plan(backend, "cuda", precision, plan_batch(largest, world, policy, 16, "sqrt", 5e-5, 1e-4),
                plan_loader(host, Thresholds(), 1.0, world, True), None, None, {}, engine=engine)


EXAMPLES: dict[str, tuple[str, object]] = {
    "ds_configs/example_zero2_offload_8gb_bf16.json": (
        "An 8 GB card in bf16: the probe found room for 6 studies, so 3 micro-batches of 6 make R2Gen's "
        "16 (rounded up to 18); optimizer states and step on the CPU (ZeRO-2 offload).",
        lambda: generated_config(_example_plan("deepspeed", "bf16", 6, 1, "faithful", {"zero": 2, "offload": "cpu"}),
                                 Topology())),
    "ds_configs/example_zero2_2gpu_fp16.json": (
        "Two GPUs without bf16 (e.g. V100s): fp16 with dynamic loss scaling, ZeRO-2 without offload, "
        "throughput policy at 64 studies per GPU.",
        lambda: generated_config(_example_plan("deepspeed", "fp16", 64, 2, "throughput", {"zero": 2, "offload": "none"}),
                                 Topology())),
    "accelerate_configs/example_1gpu_bf16.yaml": (
        "One GPU, bf16 mixed precision.",
        lambda: generated_config(_example_plan("accelerate", "bf16", 64, 1, "throughput", {}), Topology())),
    "accelerate_configs/example_2nodes_4gpus_fp16.yaml": (
        "Two nodes with 4 GPUs each, fp16; this file is node 0's (node 1's differs in machine_rank).",
        lambda: generated_config(_example_plan("accelerate", "fp16", 32, 8, "throughput", {}),
                                 Topology(gpus_per_node=4, nodes=2, node_rank=0, master_addr="10.0.0.1"))),
}
"""Example engine configs, as the planner writes them for the situation described."""


def example_text(path: str) -> str:
    import yaml

    comment, build = EXAMPLES[path]
    config = build()  # type: ignore[operator]
    if path.endswith(".json"):
        return engine_file("--ds-config").text(config, "example")
    return (f"# Example generated by r2gen-launch (launcher/engine_config.py, EXAMPLES). {comment}\n"
            "# Runs write their own <run>/accelerate_config.yaml from their plan.\n"
            + yaml.safe_dump(config, sort_keys=True))


def examples_readme() -> str:
    lines = ["# DeepSpeed configs", "",
             "Runs write `<run>/ds_config.json` from their plan (with the settings of `--ds-config FILE`",
             "where given). The examples here are generated by `python -m launcher.engine_config`",
             "(JSON has no comments, so they are described here):", ""]
    lines += [f"- `{Path(name).name}`: {comment}" for name, (comment, _) in EXAMPLES.items()
              if name.startswith("ds_configs/")]
    lines += ["", "`gradient_clipping` is 0: R2Gen clips gradient values (`clip_grad_value_` 0.1), which the",
              "adapter applies; DeepSpeed's setting clips the norm.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name in EXAMPLES:
        write_text(root / name, example_text(name))
        print(f"wrote {name}")
    write_text(root / "ds_configs" / "README.md", examples_readme())
    print("wrote ds_configs/README.md")
