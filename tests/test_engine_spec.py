"""Each engine in one place: its spec (backends/<engine>.py) answers what the launcher asks, and no code
outside backends/ branches on an engine's name.

`engine_name_branches` is a pure function of a file's text (read with `ast`): an `==`, `!=`, `in` or
`not in` comparison with a string literal naming an engine ("plain", "accelerate", "deepspeed",
"fp8", alone or in a tuple/list/set literal), or a `case "deepspeed":`, is a branch on the name.
Data is not: a tuple of a parameter's choices, a dict key, an argument (`spec("deepspeed")`).
"fp8" is a precision's name too: compared with a name that says precision it is a precision's
question. The check is also run on planted branches, so it is seen to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from backends.registry import SPECS, build_backend, engine_file, spec
from backends.spec import ConfigInputs, Topology
from r2gen.errors import BackendError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
ENGINE_NAMES = ("plain", "accelerate", "deepspeed", "fp8")
CHECKED = ("launcher", "r2gen", "bench")



def _engine_literals(node: ast.AST) -> list[str]:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in ENGINE_NAMES]


def _says_precision(node: ast.AST) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        name = str(node.slice.value)
    return "precision" in name


def engine_name_branches(source: str) -> list[str]:
    """'line: code' for each comparison (or match case) of a value with an engine's name in `source`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:]):
                if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                    continue
                for literal_side, other in ((left, right), (right, left)):
                    names = _engine_literals(literal_side)
                    if names and not (names == ["fp8"] and _says_precision(other)):
                        found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.match_case):
            patterns = node.pattern.patterns if isinstance(node.pattern, ast.MatchOr) else [node.pattern]
            if any(isinstance(p, ast.MatchValue) and _engine_literals(p.value) for p in patterns):
                found.append(f"{node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    return list(dict.fromkeys(found))


def test_no_code_outside_backends_branches_on_an_engine_name() -> None:
    sources = sorted(p for package in CHECKED for p in (ROOT / package).rglob("*.py"))
    assert len(sources) > 30  # the packages were found
    wrong = [f"{path.relative_to(ROOT)}:{branch}" for path in sources
             for branch in engine_name_branches(path.read_text(encoding="utf-8"))]
    assert wrong == [], "ask the engine's spec (backends.registry.spec(name)) instead"


@pytest.mark.parametrize("source", [
    'if backend == "deepspeed":\n    backend.configure(config)\n',
    'if plan.backend != "accelerate":\n    pass\n',
    'ok = backend in ("plain", "fp8")\n',
    'ok = "fp8" == engine\n',
    'ok = name not in {"deepspeed"}\n',
    'gpu = spec["backend"] in ["deepspeed", "fp8"]\n',
    'ok = engine == "fp8"\n',  # the engine fp8, not the precision
    'match backend:\n    case "deepspeed" | "fp8":\n        pass\n',
    'def f(x):\n    return 1 if x.backend == "plain" else 2\n',
])
def test_a_planted_engine_name_branch_is_reported(source: str) -> None:
    assert len(engine_name_branches(source)) == 1


@pytest.mark.parametrize("source", [
    'BACKENDS = ("plain", "accelerate", "deepspeed", "fp8")\n',        # choices: data
    'CONFIGS = {"deepspeed": "ds_config.json"}\n',                      # a dict key: data
    'engine = spec("deepspeed")\n',                                     # an argument
    'choice = EngineChoice("deepspeed", precision, {}, "why")\n',      # a decision that names an engine
    'ok = precision == "fp8"\nok = plan.precision != "fp8"\nok = run["precision"] == "fp8"\n',
    'auto = backend_name == "auto"\n',
    'ok = engine.needs_gpu and device != "cuda"\n',
])
def test_data_and_precision_questions_are_not_reported(source: str) -> None:
    assert engine_name_branches(source) == []


# -- an engine is found by its name in the registry, and once --------------------------------------------

NAME_LOOKUPS_ALLOWED = {
    ("launcher/plan.py", "spec"): "Plan.spec: the engine plan.json names",
    ("launcher/launch_file.py", "spec"): "Launch.spec: the engine launch.json names",
    ("launcher/probe.py", "spec"): "ProbeRequest.spec: a request crosses into the probe's process by name",
    ("launcher/auto.py", "spec"): "EngineChoice.spec: the engine auto's measurements chose",
    ("launcher/auto.py", "measured_first"): "the engine auto probes first",
    ("launcher/request.py", "probe_request"): "probe --backend: the engine the user typed",
}
"""Where a name becomes an engine outside backends/registry.py: each typed value that stores a name (a file,
a process boundary, a pure decision) answers `.spec` itself, and the one flag that names an engine."""


def engine_lookups(source: str) -> list[tuple[str, str]]:
    """(enclosing function, code) for each lookup of an engine by a name that is not a literal in `source`:
    a call of `spec(...)` or `build_backend(...)`, `SPECS[...]` or `SPECS.get(...)`."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        lookup = False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("spec", "build_backend"):
            lookup = not (node.args and isinstance(node.args[0], ast.Constant))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "SPECS":
            lookup = True
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "SPECS"):
            lookup = True
        if lookup:
            found.append((function, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def test_no_engine_is_looked_up_by_name_outside_the_registry() -> None:
    sources = sorted(p for package in ("launcher", "backends", "r2gen") for p in (ROOT / package).rglob("*.py"))
    found = {(str(path.relative_to(ROOT)), function): code for path in sources if path.name != "registry.py"
             for function, code in engine_lookups(path.read_text(encoding="utf-8"))}
    assert set(found) == set(NAME_LOOKUPS_ALLOWED), "pass the EngineSpec on; names become engines only where listed"


@pytest.mark.parametrize("source", [
    "def f(plan):\n    return spec(plan.backend).file\n",
    "def f(name):\n    return SPECS[name]\n",
    "def f(name):\n    return SPECS.get(name)\n",
    "def f(plan):\n    return build_backend(plan.backend, 'cpu', 'fp32')\n",
])
def test_a_planted_name_lookup_is_reported(source: str) -> None:
    assert [function for function, _ in engine_lookups(source)] == ["f"]


def test_literal_engines_and_spec_objects_are_not_lookups() -> None:
    assert engine_lookups("backend = build_backend('plain', 'cpu', 'fp32')\nx = plan.spec.file\n") == []


# -- the specs ------------------------------------------------------------------------------------------

def test_the_registry_lists_one_spec_per_engine_file() -> None:
    assert tuple(SPECS) == ENGINE_NAMES
    for name, engine in SPECS.items():
        assert engine.name == name and __import__(f"backends.{name}", fromlist=["SPEC"]).SPEC is engine
    with pytest.raises(BackendError, match="--backend: unknown 'megatron'"):
        spec("megatron")


@pytest.mark.parametrize("device,bf16,expected", [
    ("cuda", True, {"plain": "fp32", "accelerate": "bf16", "deepspeed": "bf16", "fp8": "fp8"}),
    ("cuda", False, {"plain": "fp32", "accelerate": "fp16", "deepspeed": "fp16", "fp8": "fp8"}),
    ("cpu", False, {"plain": "fp32", "accelerate": "fp32", "deepspeed": "fp32", "fp8": "fp8"}),
])
def test_default_precision_per_device(device: str, bf16: bool, expected: dict) -> None:
    """As R2Gen (fp32) for plain, FP8's own, mixed precision for the others on a GPU."""
    assert {n: s.default_precision(device, bf16) for n, s in SPECS.items()} == expected
    assert all(s.default_precision(device, bf16) in s.precisions for s in SPECS.values())


def test_engine_options_take_defaults_and_are_validated() -> None:
    assert spec("deepspeed").engine_options() == {"zero": 2, "offload": "cpu"}
    assert spec("deepspeed").engine_options({"zero": 1, "offload": None}) == {"zero": 1, "offload": "cpu"}
    assert spec("fp8").engine_options({}) == {"fp8_impl": "auto"} and spec("plain").engine_options(None) == {}
    with pytest.raises(BackendError, match="--zero 3"):
        spec("deepspeed").engine_options({"zero": 3})
    with pytest.raises(ConfigError, match="--fp8-impl"):
        spec("fp8").engine_options({"fp8_impl": "cublas"})
    with pytest.raises(ConfigError, match="accelerate: no engine option zero"):
        spec("accelerate").engine_options({"zero": 2})


def test_build_backend_and_the_cpu_rules() -> None:
    backend = build_backend("plain", "cpu", "fp32", {})
    assert backend.name == "plain" and backend.device.type == "cpu"
    assert [s.name for s in SPECS.values() if s.needs_gpu] == ["deepspeed", "fp8"]
    assert [s.name for s in SPECS.values() if not s.several_cpu_processes] == ["accelerate"]


def test_config_files_and_the_configure_hook() -> None:
    assert {s.name: s.file.name for s in SPECS.values() if s.file} == {
        "accelerate": "accelerate_config.yaml", "deepspeed": "ds_config.json"}
    assert engine_file("--ds-config") is spec("deepspeed").file
    with pytest.raises(ConfigError, match="--megatron-config"):
        engine_file("--megatron-config")
    deepspeed = spec("deepspeed")
    config = deepspeed.generate_config(ConfigInputs("cuda", "bf16", deepspeed.engine_options(), micro_batch=4,
                                                    accumulation=2, world_size=2))
    assert config["train_batch_size"] == 16 and "offload_optimizer" in config["zero_optimization"]
    assert spec("plain").generate_config(ConfigInputs("cpu", "fp32")) is None

    class Adapter:
        got = None

        def configure(self, value: dict) -> None:
            self.got = value

    adapter = Adapter()
    spec("plain").configure(adapter, None)  # type: ignore[arg-type]  # reads no config: a no-op
    spec("accelerate").configure(adapter, {"ignored": True})  # type: ignore[arg-type]
    assert adapter.got is None
    deepspeed.configure(adapter, config)  # type: ignore[arg-type]
    assert adapter.got is config and deepspeed.reads_config
    with pytest.raises(ConfigError, match="deepspeed: no engine config"):
        deepspeed.configure(adapter, None)  # type: ignore[arg-type]


def test_launch_commands_come_from_the_spec(tmp_path: Path) -> None:
    from launcher.spawn import WORKER_MODULE, launch_command

    topology = Topology(gpus_per_node=2)
    # Each engine's own launcher module and how it is told the process count (or its config file).
    expected = {"plain": ("torch.distributed.run", "--nproc_per_node=2"),
                "fp8": ("torch.distributed.run", "--nproc_per_node=2"),
                "accelerate": ("accelerate.commands.launch", str(tmp_path / "f")),
                "deepspeed": ("deepspeed.launcher.runner", "--num_gpus=2")}
    assert set(expected) == set(SPECS)
    for name, (module, count) in expected.items():
        command = launch_command(spec(name), topology, ["--launch", "x"], engine_config=tmp_path / "f")
        assert command[1:3] == ["-m", module] and count in command, (name, command)
        assert WORKER_MODULE in command and command[command.index("--launch") + 1] == "x"
    assert spec("fp8").launch is spec("plain").launch  # FP8 is the plain adapter's data parallel under torchrun


def test_a_new_engine_is_one_file_and_one_registry_line(tmp_path: Path) -> None:
    """A toy engine (plain PyTorch under another name, with an option of its own) added to a copy of the
    tree as backends/toy.py and one name in backends/registry.py's ENGINES, nothing else: it gets its
    training command, its help line and flag, and a plan that names it and says what its option means."""
    import os
    import shutil
    import subprocess
    import sys

    tree = tmp_path / "tree"
    for package in ("backends", "launcher", "r2gen"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "backends" / "toy.py").write_text(
        '"""A toy engine: plain PyTorch under another name, with one option of its own."""\n\n'
        "import dataclasses\n\nfrom backends.plain import SPEC as PLAIN, PlainBackend\nfrom backends.spec import option\n\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass ToyOptions:\n"
        '    toy_level: int = option(1, "How toy the toy engine is.")\n\n\n'
        'SPEC = dataclasses.replace(PLAIN, name="toy", title="the toy engine", options=ToyOptions,\n'
        '                           summary="Train R2Gen with the toy engine (plain PyTorch underneath).",\n'
        "                           adapter=lambda device, precision, options: PlainBackend(device, precision),\n"
        '                           options_note=lambda options: f"toy level {options[\'toy_level\']}")\n')
    registry = tree / "backends" / "registry.py"
    text = registry.read_text()
    assert text.count('    "fp8",\n') == 1
    registry.write_text(text.replace('    "fp8",\n', '    "fp8",\n    "toy",\n'))
    env = {**os.environ, "PYTHONPATH": str(tree), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)

    assert "toy" in cli("--help").stdout
    page = " ".join(cli("toy", "--help").stdout.split())
    assert "Train R2Gen with the toy engine (plain PyTorch underneath)." in page
    assert "--toy-level" in page and "How toy the toy engine is." in page
    plan = cli("toy", "--device", "cpu", "--preset", "tiny", "--studies", "20", "--toy-level", "3", "--dry-run",
               "--run-dir", "runs")
    assert plan.returncode == 0, plan.stderr[-2000:]
    shown = " ".join((plan.stdout + plan.stderr).split())
    assert "toy: as asked" in shown and "toy level 3" in shown, shown[-2000:]
