"""A run's report.html: written at the end of every run, drawn again by `r2gen-launch report RUN` for a
run that is still going or was killed; rendered in headless Chromium with every chart and the samples
table on screen. The pure page is checked on a hand-made run directory (what each chart draws)."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from browser import assert_renders
from child_env import cli_env, run_cli
from launcher.run_report import read_run_files, render_run_report
from r2gen.errors import ConfigError

RUN = ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", "--beam-size", "1", "--num-workers", "0",
       "--val-every", "1", "--log-every", "1"]
CHARTS = ("chart-loss-step", "chart-loss-epoch", "chart-bleu4", "chart-cider", "chart-findings", "chart-speed",
          "chart-data-wait", "chart-memory", "chart-gpu-util", "chart-probe")
NS = "{http://www.w3.org/2000/svg}"


def _cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return run_cli(args, tmp, COLUMNS="300")


def _charts(page: str) -> dict[str, ET.Element]:
    found = dict(re.findall(r'<img id="(chart-[a-z0-9-]+)" class="chart" src="data:image/svg\+xml;base64,([^"]+)"', page))
    return {name: ET.fromstring(base64.b64decode(data)) for name, data in found.items()}


def _text(svg: ET.Element) -> str:
    return " ".join(t.text or "" for t in svg.iter(f"{NS}text"))


def _sample_texts(run_dir: Path) -> list[str]:
    """The first test study's id and the start of its generated report, as the page must show them."""
    reports = sorted((run_dir / "reports").glob("test_epoch*.json")) or sorted((run_dir / "reports").glob("val_epoch*.json"))
    first = json.loads(reports[-1].read_text())[0]
    return [first["id"], first["generated"][:30]]


# --- the page, from a hand-made run directory ------------------------------------------------------

def _made_run(tmp: Path, findings: bool = True, killed: bool = False) -> Path:
    run = tmp / "run"
    (run / "reports").mkdir(parents=True)
    images = tmp / "data" / "images"
    truth = {"heart": "enlarged", "effusion": "none", "opacity": "none", "pneumothorax": "absent", "device": "none"}
    studies = []
    for i in range(2):
        (images / f"s{i}").mkdir(parents=True)
        for view in range(2):
            Image.new("L", (64, 64), 40 + 80 * view).save(images / f"s{i}" / f"{view}.png")
        studies.append({"id": f"s{i}", "report": "The heart is enlarged.", "image_path": [f"s{i}/0.png", f"s{i}/1.png"],
                        "split": "test", **({"findings": truth} if findings else {})})
    (tmp / "data" / "annotation.json").write_text(json.dumps({"train": [], "val": [], "test": studies}))
    (run / "config.json").write_text(json.dumps({"annotation": str(tmp / "data" / "annotation.json"),
                                                 "image_dir": str(images), "backend": "plain on cuda (bf16)",
                                                 "train": {"preset": "iu_xray", "epochs": 3}}))
    probe = {"points": [[8, 10.0], [16, 14.0]], "fixed_gib": 6.0, "per_sample_gib": 0.5, "micro_batch": 48,
             "budget_gib": 40.0}
    (run / "plan.json").write_text(json.dumps({"device": "cuda", "memory_budget_gib": 40.0, "probe": probe,
                                               "reasons": {"probe": "measured"}, "batch": {
                                                   "micro_batch": 48, "reasons": {"micro_batch": "48: <the probe's>"}}}))
    records = []
    t0 = 1.8e9
    for epoch, bleu in ((1, 0.2), (2, 0.4), (3, 0.3)):
        for step in range(2):
            records.append({"step": 2 * epoch + step, "epoch": epoch, "train/loss": 3.0 - epoch / 2,
                            "perf/samples_per_s": 100.0 + epoch, "perf/data_wait_pct": 5.0,
                            "memory/allocated_gib": 12.0, "memory/reserved_gib": 20.0, "gpu/util_pct": 90.0,
                            "time/unix_s": t0 + 60 * (2 * epoch + step)})
        records.append({"step": 2 * epoch + 1, "epoch": epoch, "train/loss_epoch": 2.5, "time/unix_s": t0 + 60 * epoch})
        records.append({"step": 2 * epoch + 1, "epoch": epoch, "val/BLEU_4": bleu, "val/CIDEr": bleu * 2, "val/loss": 2.0,
                        **({"val/findings_macro_f1": bleu} if findings else {}), "time/unix_s": t0 + 61 * epoch})
    if not killed:
        records.append({"step": 7, "epoch": 3, "test/BLEU_4": 0.25, "best_epoch": 2, "best_test/BLEU_4": 0.35})
        records.append({"step": 7, "epoch": 3, "baseline_val/BLEU_4": 0.1, "perf/train_samples_per_s": 101.0})
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + ('{"step": 8, "train/lo' if killed else ""))  # a kill mid-line
    generated = "the heart is normal . <script>alert(1)</script>"
    (run / "reports" / "val_epoch002.json").write_text(json.dumps(
        [{"id": "s0", "ground_truth": "the heart is enlarged .", "generated": generated}]))
    return run


def test_page_draws_every_chart_with_the_best_epoch_the_budget_and_the_probe(tmp_path: Path) -> None:
    page = render_run_report(read_run_files(_made_run(tmp_path)))
    charts = _charts(page)
    assert tuple(charts) == CHARTS
    assert "best epoch 2" in _text(charts["chart-bleu4"])  # logged best_epoch
    assert len(charts["chart-bleu4"].findall(f"{NS}polyline")) == 1  # val over three epochs; test one point
    assert "baseline val" in _text(charts["chart-bleu4"])
    assert "plan's budget" in _text(charts["chart-memory"]) and len(charts["chart-memory"].findall(f"{NS}polyline")) == 2
    probe = _text(charts["chart-probe"])
    assert "chosen 48" in probe and "fitted line" in probe and "budget" in probe
    assert len(charts["chart-probe"].findall(f"{NS}circle")) == 2  # the two measured points
    assert "finished" in page and "48: &lt;the probe&#x27;s&gt;" in page  # the plan's reasons, escaped
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '<mark class="wrong">heart: normal</mark>' in page  # the stated finding that disagrees
    assert page.count("data:image/png;base64,") == 2  # both views of the shown study


def test_a_killed_run_without_findings_labels_draws_what_is_there(tmp_path: Path) -> None:
    run = _made_run(tmp_path, findings=False, killed=True)
    files = read_run_files(run)
    assert len(files.records) == 12 and not files.running  # the half-written line is left out
    page = render_run_report(files)
    charts = _charts(page)
    assert tuple(charts) == CHARTS
    assert "best epoch 2" in _text(charts["chart-bleu4"])  # recomputed: the first epoch of the highest val BLEU-4
    assert "no findings labels" in _text(charts["chart-findings"])
    assert "stopped or killed" in page and "mark" not in page.split('id="samples"')[1]
    assert "Findings F1" not in page  # absent from the scores table, not zero


def test_report_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a run directory"):
        read_run_files(tmp_path)
    result = _cli(["report", str(tmp_path / "missing")], tmp_path)
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"error: RUN: {tmp_path / 'missing'} is not a directory"]
    assert not (tmp_path / "missing").exists()


# --- real runs, rendered in Chromium ----------------------------------------------------------------

@pytest.mark.slow
def test_a_cpu_run_writes_its_report_and_it_renders(tmp_path: Path) -> None:
    result = _cli([*RUN, "--epochs", "2", "--run-dir", str(tmp_path / "runs"), "--name", "r"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    page = (run / "report.html").read_text()
    assert f"report: {run / 'report.html'}" in " ".join(result.stderr.split())
    charts = _charts(page)
    assert tuple(charts) == CHARTS and "finished" in page
    assert "no GPU" in _text(charts["chart-memory"])  # a CPU run says why, not an empty frame
    assert_renders(run / "report.html", _sample_texts(run), tmp_path / "run.png", charts=len(CHARTS))


@pytest.mark.slow
def test_a_run_still_going_and_then_killed_is_drawn_from_what_it_wrote(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = subprocess.Popen([sys.executable, "-m", "launcher.cli", *RUN, "--epochs", "500", "--run-dir", str(runs),
                              "--name", "r"], env=cli_env(tmp_path, COLUMNS="300"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    run = runs / "r"
    deadline = time.monotonic() + 300
    try:
        while first.poll() is None and time.monotonic() < deadline and not list((run / "reports").glob("val_*.json")):
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]
        going = _cli(["report", str(run), "--out", str(tmp_path / "going.html")], tmp_path)
        assert going.returncode == 0, going.stderr[-2000:]
        assert f"running: process {first.pid}" in (tmp_path / "going.html").read_text()
    finally:
        first.send_signal(signal.SIGKILL)  # no cleanup runs: what is on disk is all there is
        first.communicate()
    assert not (run / "report.html").exists()
    killed = _cli(["report", str(run)], tmp_path)
    assert killed.returncode == 0, killed.stderr[-2000:]
    page = (run / "report.html").read_text()
    assert "stopped or killed" in page and tuple(_charts(page)) == CHARTS
    assert_renders(run / "report.html", _sample_texts(run), tmp_path / "killed.png", charts=len(CHARTS))
