"""Shared fixtures: a small synthetic data set, GPU skipping, an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
