"""Imports point one way: launcher -> backends -> r2gen, and nothing imports the command line (launcher.cli).

Every .py file under launcher/, backends/, r2gen/ and bench/ is read with `ast` (imports at module
level and inside functions alike) and checked by `back_arrows`, a pure function of a module's name
and the names it imports; the check is also run on planted back-arrows, so it is seen to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "backends", "r2gen", "bench")



def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name `source` (the text of `module`; its __init__.py if `is_package`) imports, anywhere
    in the file: `import a.b` gives a.b; `from a import b` gives a and a.b (b may be a module); relative
    imports are resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to this module's package
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def back_arrows(module: str, imported: Iterable[str]) -> list[str]:
    """The imports of `module` that point the wrong way: r2gen importing backends or launcher, backends
    importing launcher, anything importing launcher.cli (the commands)."""
    wrong: dict[str, str] = {}
    for name in sorted(set(imported)):
        if any(_within(name, reported) for reported in wrong):
            continue  # `from a.b import c`: a.b is reported, not a.b.c again
        if _within(module, "r2gen") and (_within(name, "backends") or _within(name, "launcher")):
            wrong[name] = f"{module} imports {name}: r2gen imports nothing from backends or launcher"
        elif _within(module, "backends") and _within(name, "launcher"):
            wrong[name] = f"{module} imports {name}: backends imports nothing from launcher"
        elif _within(name, "launcher.cli") and not _within(module, "launcher.cli"):
            wrong[name] = f"{module} imports {name}: nothing imports the command line"
    return list(wrong.values())


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_code_imports_one_way() -> None:
    sources = _sources()
    assert len(sources) > 30  # the packages were found
    wrong = [arrow for path in sources for arrow in back_arrows(
        module_name(path), imports_of(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"))]
    assert wrong == []


@pytest.mark.parametrize("module,source,reported", [
    ("r2gen.x", "from launcher.plan import x", "r2gen.x imports launcher.plan"),
    ("r2gen.data.x", "def f():\n    import backends.plain\n", "r2gen.data.x imports backends.plain"),
    ("r2gen.x", "from backends import plain", "r2gen.x imports backends"),
    ("backends.x", "from launcher.engine_config import engine_config_for", "backends.x imports launcher.engine_config"),
    ("launcher.plan", "from launcher import cli", "launcher.plan imports launcher.cli"),
    ("bench.x", "def f():\n    from launcher.cli import _options\n", "bench.x imports launcher.cli"),
    ("launcher.probe", "from .cli import app", "launcher.probe imports launcher.cli"),
    ("r2gen.checkpoint_evaluation", "from backends.registry import build_backend",
     "r2gen.checkpoint_evaluation imports backends.registry"),
    ("launcher.spawn", "from launcher.cli import _print_result", "launcher.spawn imports launcher.cli"),
])
def test_a_planted_back_arrow_is_reported(module: str, source: str, reported: str) -> None:
    arrows = back_arrows(module, imports_of(source, module))
    assert len(arrows) == 1 and arrows[0].startswith(reported + ":")


@pytest.mark.parametrize("module,source", [
    ("launcher.plan", "from backends.fp8 import MIN_CAPABILITY\nfrom r2gen.config import preset"),
    ("backends.plain", "from r2gen.engine import AUTOCAST_DTYPES"),
    ("r2gen.train", "from r2gen.step import train_step\nimport torch"),
    ("launcher.cli", "from launcher.options import *"),
    ("launcher.worker", "from launcher.console import print_result"),
])
def test_imports_that_point_down_pass(module: str, source: str) -> None:
    assert back_arrows(module, imports_of(source, module)) == []
