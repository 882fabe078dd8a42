"""ImageNet weights as the published R2Gen starts from them (issue 34): `--visual-weights imagenet` (the default
for the paper's presets on your own data) takes torchvision's cache, else downloads into it through
torch.hub as torchvision does; tested against a real HTTP server on the loopback interface standing in
for the weights' host (R2GEN_IMAGENET_URL), never a stand-in for the loading code. No server: one line
naming both ways on, exit 2, before training. The embedded set never opens a connection."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from launcher.cli import app
from launcher.run import default_visual_weights, visual_weights_reason
from r2gen.model.visual_extractor import (IMAGENET_URL_VARIABLE, VisualExtractor, WeightsError, imagenet_cache_path,
                                          init_visual_weights)


class WeightsHost:
    """A loopback HTTP server for one folder; counts the requests it answered."""

    def __init__(self, folder: Path) -> None:
        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802 - the http.server name
                host.requests.append(self.path)
                super().do_GET()

            def log_message(self, *_):
                pass

        self.requests: list[str] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


pytestmark = pytest.mark.usefixtures("torch_home")  # torchvision's cache of each test's own (conftest)


@pytest.fixture
def host(tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    host = WeightsHost(served)
    host.folder = served
    yield host
    host.close()


def _publish(folder: Path, arch: str, state: dict, corrupt: bool = False) -> str:
    """The state_dict saved under torchvision's naming, <arch>-<first 8 hex digits of its sha256>.pth."""
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    name = f"{arch}-{('0' if digest[0] != '0' else '1') + digest[1:] if corrupt else digest}.pth"
    tmp.rename(folder / name)
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_downloaded_checked_cached_and_used(host: WeightsHost, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    served = torchvision.models.resnet18(weights=None).state_dict()
    name = _publish(host.folder, "resnet18", served)
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"{host.url}/{name}")
    extractor = VisualExtractor("resnet18")
    source = init_visual_weights(extractor, Path("imagenet"))
    cached = imagenet_cache_path("resnet18")
    assert cached.is_file() and cached.name == name and "downloaded" in source and str(cached) in source
    conv = extractor.model[0].weight
    assert torch.equal(conv, served["conv1.weight"])
    host.close()  # from the cache now: no host needed
    again = VisualExtractor("resnet18")
    assert "from the torchvision cache" in init_visual_weights(again, Path("imagenet"))
    assert torch.equal(again.model[0].weight, served["conv1.weight"]) and host.requests == [f"/{name}"]


def test_a_download_that_fails_its_hash_is_refused_and_removed(host: WeightsHost,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name = _publish(host.folder, "resnet18", torchvision.models.resnet18(weights=None).state_dict(), corrupt=True)
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"{host.url}/{name}")
    with pytest.raises(WeightsError, match="failed its sha256 check.*not kept.*weights import.*--visual-weights random"):
        init_visual_weights(VisualExtractor("resnet18"), Path("imagenet"))
    folder = imagenet_cache_path("resnet18").parent
    assert not folder.exists() or list(folder.iterdir()) == []  # no file, no temporary left


def test_no_host_is_one_line_naming_both_ways_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"http://127.0.0.1:{_free_port()}/resnet18-00000000.pth")
    with pytest.raises(WeightsError) as caught:
        init_visual_weights(VisualExtractor("resnet18"), Path("imagenet"))
    message = str(caught.value)
    assert "could not be reached" in message and "weights import" in message and "--visual-weights random" in message
    assert "\n" not in message


def test_which_runs_start_from_imagenet() -> None:
    assert default_visual_weights("iu_xray", embedded=False) == Path("imagenet")
    assert default_visual_weights("mimic_cxr", embedded=False) == Path("imagenet")
    assert default_visual_weights("iu_xray", embedded=True) is None  # the embedded set: never the network
    assert default_visual_weights("tiny", embedded=False) is None
    assert "published R2Gen starts from ImageNet" in visual_weights_reason(None, "mimic_cxr", embedded=False)
    assert "never use the network" in visual_weights_reason(None, "iu_xray", embedded=True)
    assert visual_weights_reason(Path("random"), "iu_xray", embedded=False) == "--visual-weights"


def test_random_is_on_purpose() -> None:
    extractor = VisualExtractor("resnet18")
    assert init_visual_weights(extractor, Path("random")) == "resnet18 randomly initialized (--visual-weights random)"


def test_the_paper_preset_on_own_data_stops_before_training_without_network(
        small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plain --preset iu_xray --ann-path ... with an empty cache and no host: exit 2, one line, nothing written."""
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"http://127.0.0.1:{_free_port()}/resnet101-00000000.pth")
    result = CliRunner().invoke(app, ["plain", "--preset", "iu_xray", "--device", "cpu", "--ann-path", str(small_set),
                                      "--run-dir", str(tmp_path / "runs"), "--num-workers", "0"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "weights import" in errors[0] and "--visual-weights random" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_the_paper_preset_downloads_and_the_plan_says_so(small_set: Path, tmp_path: Path, host: WeightsHost,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command with the loopback host: ResNet-101's ImageNet file (random weights, 170 MB) downloaded,
    cached and loaded; --dry-run stops after the plan."""
    torch.manual_seed(2)
    name = _publish(host.folder, "resnet101", torchvision.models.resnet101(weights=None).state_dict())
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"{host.url}/{name}")
    result = CliRunner().invoke(app, ["plain", "--preset", "iu_xray", "--device", "cpu", "--ann-path", str(small_set),
                                      "--dry-run", "--num-workers", "0"], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "visual extractor: resnet101 ImageNet weights, downloaded into the torchvision cache" in result.output
    assert "visual weights" in result.output  # the plan's row (its reason: test_which_runs_start_from_imagenet)
    assert imagenet_cache_path("resnet101").is_file() and host.requests == [f"/{name}"]


def test_the_embedded_set_never_opens_a_connection(tmp_path: Path, host: WeightsHost,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """iu_xray on the embedded set (what `auto` runs on a GPU), with a host ready to answer: not asked."""
    name = _publish(host.folder, "resnet101", {"unused": torch.zeros(1)})
    monkeypatch.setenv(IMAGENET_URL_VARIABLE, f"{host.url}/{name}")
    result = CliRunner().invoke(app, ["plain", "--preset", "iu_xray", "--device", "cpu", "--studies", "20",
                                      "--dry-run", "--num-workers", "0"], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "randomly initialized" in result.output and host.requests == []
