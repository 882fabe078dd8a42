"""Shared fixtures: Triton's interpreter where no GPU is, a small synthetic data set, GPU skipping, an isolated cache, a PATH without java,
and scratch folders for module fixtures that go when their module passed (runs hold checkpoints of
~100-200 MB each: kept, the suite would leave ~20 GB behind)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Without an NVIDIA device, Triton kernels (the fused relational memory's) run in Triton's interpreter.
# It must be on before triton.language is first imported (torchvision imports it, with torch's
# Triton helpers), so here, before torch: kernels defined or run without it cannot be interpreted.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from r2gen.data.synth import synthesize


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """annotation.json of a 30-study synthetic IU X-Ray set (21/3/6 train/val/test), made once."""
    return synthesize(tmp_path_factory.mktemp("synth") / "set", studies=30, seed=1, image_size=64)


@pytest.fixture(scope="module")
def module_scratch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """make(name) -> a fresh folder for a module-scoped fixture; all of them are removed when the module
    ends with no new failure (kept for a look when one of its tests failed), as pytest does with a
    passed test's tmp_path under tmp_path_retention_policy = "failed"."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torchvision's cache (TORCH_HOME) in the test's own folder: never the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path)
    return tmp_path / "torch"


@pytest.fixture(autouse=True)
def restored_environment():
    """Engines set process-wide variables (a one-process DeepSpeed group sets LOCAL_RANK, as a
    launcher would); a later test's subprocess must not inherit them."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's ~/.cache from tests."""
    monkeypatch.setenv("R2GEN_LAUNCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session", autouse=True)
def path_without_java(tmp_path_factory: pytest.TempPathFactory):
    """The suite runs with a PATH that finds no `java` (so METEOR is n/a): starting METEOR's JVM, which
    loads its paraphrase tables, takes ~12 s per process on 2 cores, most of a short CLI run's time.
    A folder on PATH that holds java is replaced by a mirror of links to everything else in it (the
    compilers DeepSpeed's JIT builds need stay). Tests of METEOR itself ask for `java_on_path`.
    Yields the original PATH."""
    from r2gen import scores

    original = os.environ.get("PATH", "")
    if shutil.which("java") is None:
        yield original
        return
    mirrors = tmp_path_factory.mktemp("path-without-java")
    folders = []
    for i, folder in enumerate(original.split(os.pathsep)):
        if folder and (Path(folder) / "java").exists():
            mirror = mirrors / str(i)
            mirror.mkdir()
            for entry in Path(folder).iterdir():
                if entry.name != "java":
                    (mirror / entry.name).symlink_to(entry)
            folder = str(mirror)
        folders.append(folder)
    os.environ["PATH"] = os.pathsep.join(folders)
    assert shutil.which("java") is None, os.environ["PATH"]
    scores.java_available.cache_clear()
    yield original
    os.environ["PATH"] = original
    scores.java_available.cache_clear()


@pytest.fixture
def java_on_path(path_without_java: str, monkeypatch: pytest.MonkeyPatch):
    """The machine's own PATH (with its java, where it has one) for this test and its child processes."""
    from r2gen import scores

    monkeypatch.setenv("PATH", path_without_java)
    scores.java_available.cache_clear()
    yield
    scores.java_available.cache_clear()
