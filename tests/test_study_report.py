"""The precision study's HTML report: contents, escaping, embedded SVG charts, atomic writes, real Chromium."""

from __future__ import annotations

import base64
import copy
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from browser import assert_renders
from r2gen.atomic import FILE_MODE as _FILE_MODE
from launcher.report import render_report, write_report

IDS = ["CXR1_1_IM-0001", "CXR2_1_IM-0002", "CXR3_1_IM-0003", "CXR4_1_IM-0004", "CXR5_1_IM-0005"]
TRUTH = ["the heart is normal in size. the lungs are clear.", "no acute cardiopulmonary abnormality.",
         "mild cardiomegaly. no focal consolidation.", "the mediastinum is unremarkable.",
         "no pneumothorax or pleural effusion."]
SKIP_REASON = "fp8 needs a CUDA GPU of compute capability 8.9 or newer; this machine has none"
RULE = "the fastest precision (samples/s) whose test BLEU-4 is within 0.02 of the best"
SRC = re.compile(r'<img\b[^>]*\bsrc="([^"]*)"')


def _done(precision: str, speed: float, vram: float | None, shift: float) -> dict[str, Any]:
    return {
        "precision": precision, "status": "done", "reason": None, "run_dir": f"runs/study-{precision}",
        "micro_batch": 16, "wall_s": 123.4 - shift * 100, "samples_per_s": speed, "peak_vram_gib": vram,
        "gpu_util_pct": 91.0, "train_loss": 0.61 + shift, "val_loss": 0.7, "test_loss": 0.72,
        "metrics": {"BLEU_1": 0.4, "BLEU_2": 0.3, "BLEU_3": 0.2, "BLEU_4": 0.15 - shift, "METEOR": None,
                    "ROUGE_L": 0.35, "CIDEr": 0.4},
        "findings": {"findings_macro_f1": 0.91 - shift, "findings_exact_match": 0.8},
        "baseline": {"BLEU_4": 0.552, "findings_macro_f1": 0.0, "findings_exact_match": 0.39},
        "generation_samples_per_s": 120.0, "seeds": [1, 2, 3], "time_to_target_s": 40.0 + shift * 100,
        "spread": {"findings_macro_f1": {"runs": [0.90 - shift, 0.91 - shift, 0.92 - shift]},
                   "BLEU_4": {"runs": [0.14 - shift, 0.15 - shift, 0.16 - shift]},
                   "samples_per_s": {"runs": [speed - 1, speed, speed + 1]}, "peak_vram_gib": None,
                   "time_to_target_s": {"runs": [39.0 + shift * 100, 40.0 + shift * 100, 41.0 + shift * 100]}},
        "loss_curve": [[step, 3.2 - 0.1 * step + shift] for step in range(1, 30)],
        "samples": [{"id": i, "ground_truth": t, "generated": f"{precision} report {n}: {t}"}
                    for n, (i, t) in enumerate(zip(IDS, TRUTH))],
    }


@pytest.fixture()
def summary() -> dict[str, Any]:
    bf16 = _done("bf16", 97.3, 2.1, 0.01)
    bf16["engine"] = "plain on cuda (bf16)"
    bf16["samples"][2]["generated"] = "<script>alert('x')</script> & the heart"
    return {
        "title": "r2gen-launch precision study", "created": "2026-11-23T19:30:00Z",
        "hardware": "NVIDIA H100 80GB HBM3 (1 GPU), torch 2.11.0+cu130", "preset": "iu_xray", "backend": "plain",
        "epochs": 3, "seeds": [1, 2, 3], "target_f1": 0.9, "rule": RULE, "recommended": "bf16",
        "quality_key": "findings_macro_f1", "comparisons": {"fp32": "best", "bf16": "within the spread"},
        "precisions": [_done("fp32", 58.7, 3.68, 0.0), bf16,
                       {"precision": "fp8", "status": "skipped", "reason": SKIP_REASON}],
    }


def _svgs(page: str) -> dict[str, ET.Element]:
    """Every <img> of the page: its id -> the parsed SVG of its data URI (asserting that it is one)."""
    images = re.findall(r"<img\b[^>]*>", page)
    assert images and len(images) == len(SRC.findall(page))
    out = {}
    for tag in images:
        src = SRC.search(tag).group(1)
        assert src.startswith("data:image/svg+xml;base64,")
        root = ET.fromstring(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        for attribute in (r'\bwidth="\d+"', r'\bheight="\d+"', r'\balt="[^"]+"'):
            assert re.search(attribute, tag)
        out[re.search(r'\bid="([^"]+)"', tag).group(1)] = root
    return out


def _svg_text(root: ET.Element) -> str:
    return " ".join("".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text"))


def test_page_has_header_rows_reason_and_recommendation(summary: dict[str, Any]) -> None:
    page = render_report(summary)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    for text in ("r2gen-launch precision study", "2026-11-23T19:30:00Z", "NVIDIA H100 80GB HBM3 (1 GPU)", "iu_xray",
                 "plain", SKIP_REASON, RULE, "Recommended precision: bf16"):
        assert text in page
    rows = re.findall(r'<tr[^>]*data-precision="([^"]+)"', page)
    assert rows == ["fp32", "bf16", "fp8"]
    fp8_row = re.search(r'<tr[^>]*data-precision="fp8".*?</tr>', page, re.S).group(0)
    assert "skipped" in fp8_row and fp8_row.count(">n/a<") == 20
    fp32_row = re.search(r'<tr[^>]*data-precision="fp32".*?</tr>', page, re.S).group(0)
    bf16_row = re.search(r'<tr[^>]*data-precision="bf16".*?</tr>', page, re.S).group(0)
    assert "plain on cuda (bf16)" in bf16_row  # what ran, under its status
    assert ">58.7<" in fp32_row and ">3.68<" in fp32_row and ">0.150<" in fp32_row and ">n/a<" in fp32_row  # METEOR
    assert 'class="recommended" data-precision="bf16"' in page
    assert ">0.910<" in fp32_row and ">0.800<" in fp32_row  # findings macro F1 and exact match
    assert "Constant-report baseline on test" in page and "BLEU-4 0.552, findings F1 0.000, findings exact 0.390" in page


def test_samples_table_has_every_study_and_precision(summary: dict[str, Any]) -> None:
    page = render_report(summary)
    table = re.search(r'<table id="samples".*?</table>', page, re.S).group(0)
    assert "Generated (fp32)" in table and "Generated (bf16)" in table and "fp8" not in table
    for n, (study, truth) in enumerate(zip(IDS, TRUTH)):
        assert study in table and truth in table and f"fp32 report {n}: {truth}" in table
        if n != 2:
            assert f"bf16 report {n}: {truth}" in table
    assert table.count("<tr>") == 1 + len(IDS)


def test_user_text_is_escaped(summary: dict[str, Any]) -> None:
    summary["title"] = "<b>study</b>"
    summary["precisions"][2]["reason"] = 'no "fp8" <here>'
    page = render_report(summary)
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; the heart" in page
    assert "<b>study</b>" not in page and "&lt;b&gt;study&lt;/b&gt;" in page
    assert "no &quot;fp8&quot; &lt;here&gt;" in page


def test_charts_are_valid_svg_data_uris(summary: dict[str, Any]) -> None:
    svgs = _svgs(render_report(summary))
    assert set(svgs) == {"chart-seeds", "chart-loss", "chart-throughput", "chart-memory"}
    ns = "{http://www.w3.org/2000/svg}"
    seeds = svgs["chart-seeds"]  # each seed's findings F1 a point, the mean written beside
    assert len(seeds.findall(f"{ns}circle")) == 2 * 3 and "0.910" in _svg_text(seeds) and "0.900" in _svg_text(seeds)
    loss = svgs["chart-loss"]
    assert len(loss.findall(f"{ns}polyline")) == 2 and "step" in _svg_text(loss) and "loss" in _svg_text(loss)
    assert "fp32" in _svg_text(loss) and "bf16" in _svg_text(loss) and "fp8" not in _svg_text(loss)
    assert len(svgs["chart-throughput"].findall(f"{ns}rect")) == 1 + 2  # background + one bar per done precision
    assert "58.7" in _svg_text(svgs["chart-throughput"]) and "97.3" in _svg_text(svgs["chart-throughput"])
    assert "3.68" in _svg_text(svgs["chart-memory"])


def test_zero_done_precisions_render(summary: dict[str, Any]) -> None:
    summary["recommended"] = None
    summary["precisions"] = [summary["precisions"][2],
                             {"precision": "fp16", "status": "failed", "reason": "CUDA out of memory"},
                             {"precision": "fp32", "status": "pending"}]
    page = render_report(summary)
    assert "No precision finished" in page and "CUDA out of memory" in page and "pending" in page
    assert 'id="samples"' not in page and "<img" not in page and "no charts to draw" in page
    rows = re.findall(r'<tr[^>]*data-precision="([^"]+)"', page)
    assert rows == ["fp8", "fp16", "fp32"]
    assert render_report({"precisions": []}).startswith("<!DOCTYPE html>")
    assert "n/a" in render_report({})


def test_edge_cases_one_point_identical_values_no_memory_long_reports(summary: dict[str, Any]) -> None:
    one = copy.deepcopy(summary["precisions"][0])
    one["loss_curve"] = [[5, 2.0]]
    one["peak_vram_gib"] = one["gpu_util_pct"] = None
    one["samples"][0]["generated"] = "word " * 3000 + "x" * 5000
    summary["precisions"] = [one, summary["precisions"][2]]
    summary["recommended"] = "fp32"
    page = render_report(summary)
    svgs = _svgs(page)
    assert all("nan" not in ET.tostring(root, encoding="unicode").lower() for root in svgs.values())
    assert len(svgs["chart-loss"].findall("{http://www.w3.org/2000/svg}circle")) == 1
    assert "n/a" in _svg_text(svgs["chart-memory"]) and "Peak memory is n/a" in page
    assert "x" * 5000 in page

    same = [copy.deepcopy(one), copy.deepcopy(one)]
    same[1]["precision"] = "bf16"
    for entry in same:
        entry["loss_curve"] = [[1, 1.0], [2, 1.0], [3, 1.0]]
        entry["samples_per_s"] = 0.0
        entry["peak_vram_gib"] = 4.0
    summary["precisions"] = same
    for root in _svgs(render_report(summary)).values():
        assert "nan" not in ET.tostring(root, encoding="unicode").lower()

    same[1]["samples_per_s"] = None  # one bar missing: drawn as "n/a", the other still a bar
    throughput = _svgs(render_report(summary))["chart-throughput"]
    assert "n/a" in _svg_text(throughput) and len(throughput.findall("{http://www.w3.org/2000/svg}rect")) == 2


def test_write_report_is_atomic(summary: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "study" / "report.html"
    assert write_report(summary, target) == target
    assert target.read_text(encoding="utf-8") == render_report(summary)
    target.write_text("old", encoding="utf-8")
    write_report(summary, target)
    assert target.read_text(encoding="utf-8") == render_report(summary)
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]
    assert target.stat().st_mode & 0o777 == _FILE_MODE  # as open() would make it (mkstemp: 0600)


def test_renders_in_headless_chromium(summary: dict[str, Any], tmp_path: Path) -> None:
    page_file = write_report(summary, tmp_path / "report.html")
    assert_renders(page_file, [TRUTH[0], f"fp32 report 0: {TRUTH[0]}", f"bf16 report 1: {TRUTH[1]}",
                               "<script>alert('x')</script>"],  # shown as text, not run
                   tmp_path / "report.png", charts=4)
