"""A run's report.html: what its run directory holds so far, as one self-contained page.

Written at the end of every run (launcher.run) and by `r2gen-launch report RUN` at any time: on a run
that is still going or was killed it draws what is there (metrics.jsonl up to its last whole line,
the newest reports/). `read_run_files` gathers the files (tolerant: a file not written yet is
empty, not an error); `render_run_report` is pure and draws with launcher.charts, the drawing path
the precision study's report shares. Sections: scores (best val epoch, test, the constant-report
baseline), ten charts (train loss per step and per epoch; val/test BLEU-4, CIDEr and findings F1 per
epoch with the best epoch marked; samples/s, data wait, GPU memory against the plan's budget, GPU
utilization over time; the probe's points with its fitted line and the chosen micro-batch), the plan
with its reasons, and a few test studies: both images, the ground truth and the generated report,
the findings that disagree highlighted (on data that has findings labels).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from launcher.charts import NA, PALETTE, Level, Marker, Series, esc, fmt, img, line_chart, number, page, thin
from launcher.runlock import live_holder
from r2gen.errors import ConfigError
from r2gen.state import MONITOR

REPORT_NAME = "report.html"
SAMPLES = 6           # test studies shown side by side
THUMB_PX = 180        # the longer side of each view's thumbnail
SCORES = (("BLEU_4", "BLEU-4"), ("CIDEr", "CIDEr"), ("findings_macro_f1", "Findings F1"),
          ("findings_exact_match", "Findings exact"))
CSS = """
#scores td.num, #plan td { font-size: 13px; }
#plan td.reason { color: #32383f; overflow-wrap: anywhere; }
.status-finished { background: #1a7f37; } .status-running { background: #0969da; }
.status-stopped { background: #9a6700; }
#samples td.views img { width: 46%; margin: 1%; image-rendering: auto; border: 1px solid #d0d7de; }
#samples .findings { display: block; margin-top: 6px; font-size: 12px; color: #57606a; white-space: normal; }
#samples mark.wrong { background: #ffd8d3; color: #82071e; border-radius: 4px; padding: 0 3px; font-weight: 600; }
#samples .agree { background: #eef6ee; border-radius: 4px; padding: 0 3px; }
"""


@dataclass
class RunFiles:
    """What a run directory holds so far; every part may be empty (a run that is just starting)."""
    path: Path
    config: dict = field(default_factory=dict)       # config.json: the training config and the data set
    plan: dict = field(default_factory=dict)         # plan.json
    records: list[dict] = field(default_factory=list)  # metrics.jsonl's whole lines
    samples: list[dict] = field(default_factory=list)  # the newest test (else val) reports' first studies
    samples_from: str = ""                           # the reports file they come from
    studies: dict[str, dict] = field(default_factory=dict)  # id -> annotation entry, for the shown samples
    image_dir: Path | None = None
    running: str = ""                                # "process N on HOST since T" while a command trains it
    clinical: dict = field(default_factory=dict)     # the newest reports/ce-*.json (r2gen-launch ce --reports)
    clinical_from: str = ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut short by a kill is left out."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _reports_file(reports: Path) -> Path | None:
    """The newest test reports (the last model's, else the best model's), else the newest val reports."""
    for prefix in ("test", "best_test", "val"):
        found = sorted(reports.glob(f"{prefix}_epoch*.json"))
        if found:
            return found[-1]
    return None


def read_run_files(run_dir: Path) -> RunFiles:
    """A run directory's files, as far as they are written; ConfigError for a folder that is no run."""
    if not run_dir.is_dir():
        raise ConfigError(f"RUN: {run_dir} is not a directory")
    if not (run_dir / "config.json").is_file() and not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"RUN: {run_dir} is not a run directory (no config.json or metrics.jsonl)")
    run = RunFiles(run_dir, config=_read_json(run_dir / "config.json") or {}, plan=_read_json(run_dir / "plan.json") or {},
                   records=read_records(run_dir / "metrics.jsonl"), running=live_holder(run_dir))
    scored = sorted((run_dir / "reports").glob("ce-*.json"), key=lambda p: p.stat().st_mtime)
    if scored and isinstance(clinical := _read_json(scored[-1]), dict) and "observations" in clinical:
        run.clinical, run.clinical_from = clinical, scored[-1].name
    chosen = _reports_file(run_dir / "reports")
    samples = _read_json(chosen) if chosen else None
    if isinstance(samples, list):
        run.samples = [s for s in samples if isinstance(s, dict)][:SAMPLES]
        run.samples_from = chosen.name
    annotation = Path(run.config["annotation"]) if run.config.get("annotation") else None
    if run.samples and annotation is not None:
        run.image_dir = Path(run.config.get("image_dir") or annotation.parent / "images")
        wanted = {str(s.get("id")) for s in run.samples}
        splits = _read_json(annotation)
        for entries in splits.values() if isinstance(splits, dict) else ():
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict) and str(entry.get("id")) in wanted:
                    run.studies[str(entry["id"])] = entry
    return run


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Render the run directory's report to `out` (default RUN/report.html), atomically."""
    from r2gen.atomic import write_text

    target = out or run_dir / REPORT_NAME
    write_text(target, render_run_report(read_run_files(run_dir)))
    return target


# --- the page ---------------------------------------------------------------------------------

def render_run_report(run: RunFiles) -> str:
    title = f"Run {run.path.name}"
    epochs = _per_epoch(run.records)
    best = _best_epoch(run.records, epochs)
    body = "\n".join((_header(run, title), _scores(run.records, epochs, best), _clinical(run),
                      _charts(run, epochs, best), _plan(run.plan), _samples(run)))
    return page(title, CSS, body)


def _status(run: RunFiles) -> tuple[str, str]:
    last = run.records[-1] if run.records else {}
    if "perf/train_samples_per_s" in last:
        return "finished", "finished"
    if run.running:
        return "running", f"running: {run.running}; this page shows what was logged so far"
    return "stopped", "stopped or killed before its end: this page shows what was logged; --keep-training continues it"


def _when(unix_s: object) -> str:
    value = number(unix_s)
    return NA if value is None else f"{datetime.fromtimestamp(value):%Y-%m-%d %H:%M:%S}"


def _header(run: RunFiles, title: str) -> str:
    css, status = _status(run)
    train = run.config.get("train") or {}
    times = [r["time/unix_s"] for r in run.records if number(r.get("time/unix_s")) is not None]
    steps = max((int(r["step"]) for r in run.records if number(r.get("step")) is not None), default=0)
    done = max((int(r["epoch"]) for r in run.records if "train/loss_epoch" in r and number(r.get("epoch"))), default=0)
    fields = (("Directory", str(run.path)), ("Engine", run.config.get("backend", NA)),
              ("Preset", train.get("preset", NA)), ("Data set", run.config.get("annotation", NA)),
              ("Epochs", f"{done} of {train.get('epochs', NA)} done, {steps} optimizer steps"),
              ("Logged", f"{_when(times[0]) if times else NA} to {_when(times[-1]) if times else NA}"))
    rows = "".join(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in fields)
    rows += f"<dt>Status</dt><dd><span class=\"status status-{css}\">{esc(css)}</span> {esc(status)}</dd>"
    return f"<header>\n<h1>{esc(title)}</h1>\n<dl class=\"meta\">{rows}</dl>\n</header>"


def _per_epoch(records: list[dict]) -> dict[int, dict]:
    """Each epoch's merged records (the epoch's loss, its val and test scores)."""
    epochs: dict[int, dict] = {}
    for record in records:
        epoch = number(record.get("epoch"))
        if epoch is not None:
            epochs.setdefault(int(epoch), {}).update(record)
    return epochs


def _best_epoch(records: list[dict], epochs: dict[int, dict]) -> int | None:
    """The loop's pick (R2Gen's rule: the first epoch of the highest val MONITOR), as logged or as recomputed."""
    logged = [int(r["best_epoch"]) for r in records if number(r.get("best_epoch"))]
    if logged:
        return logged[-1]
    scored = [(number(v.get(f"val/{MONITOR}")), e) for e, v in sorted(epochs.items())]
    scored = [(s, e) for s, e in scored if s is not None]
    return max(scored, key=lambda pair: (pair[0], -pair[1]))[1] if scored else None


def _last(records: list[dict], key: str) -> object:
    return next((r[key] for r in reversed(records) if key in r), None)


def _scores(records: list[dict], epochs: dict[int, dict], best: int | None) -> str:
    best_record = epochs.get(best or -1, {})
    head = ["Score", f"Val, best epoch ({best if best else NA})", "Val, last", "Test, last model",
            "Test, best model", "Baseline val", "Baseline test"]
    rows = []
    for key, label in SCORES:
        values = (best_record.get(f"val/{key}"), _last(records, f"val/{key}"), _last(records, f"test/{key}"),
                  _last(records, f"best_test/{key}"), _last(records, f"baseline_val/{key}"),
                  _last(records, f"baseline_test/{key}"))
        if all(v is None for v in values):
            continue  # findings on user data: absent, not zero
        rows.append(f"<tr><th>{esc(label)}</th>" + "".join(f"<td class=\"num\">{fmt(v, 3)}</td>" for v in values)
                    + "</tr>")
    if not rows:
        return "<section>\n<h2>Scores</h2>\n<p class=\"note\">No evaluation yet.</p>\n</section>"
    return ("<section>\n<h2>Scores</h2>\n<div class=\"scroll\"><table id=\"scores\"><thead><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>\n<tbody>" + "".join(rows)
            + "</tbody></table></div>\n<p class=\"note\">Test, best model: the best val epoch's checkpoint on test "
            "(R2Gen's pick). Baseline: always answering the most frequent train report (written at the run's "
            "end).</p>\n</section>")


def _clinical(run: RunFiles) -> str:
    """Clinical efficacy (r2gen-launch ce), where it was computed for this run; nothing otherwise."""
    ce = run.clinical
    if not ce:
        return ""
    rows = [f"<tr><th>{esc(name)}</th>" + "".join(f"<td class=\"num\">{fmt(o.get(k), 3)}</td>"
                                                  for k in ("precision", "recall", "f1", "auroc"))
            + f"<td class=\"num\">{esc(o.get('support'))}</td></tr>" for name, o in ce["observations"].items()]
    for average in ("macro", "micro"):
        row = ce.get(average) or {}
        auroc = ce.get("auroc_mean") if average == "macro" else None
        rows.append(f"<tr><th>{average}</th>" + "".join(f"<td class=\"num\">{fmt(v, 3)}</td>" for v in
                    (row.get("precision"), row.get("recall"), row.get("f1"), auroc)) + "<td></td></tr>")
    return ("<section>\n<h2>Clinical efficacy</h2>\n<div class=\"scroll\"><table id=\"clinical\"><thead><tr>"
            "<th>Observation</th><th>Precision</th><th>Recall</th><th>F1</th><th>AUROC</th><th>Support</th></tr>"
            "</thead>\n<tbody>" + "".join(rows) + "</tbody></table></div>\n<p class=\"note\">The CheXpert "
            f"labeler's observations on {ce.get('studies', NA)} test studies, scored as the published R2Gen "
            f"scores them ({esc(run.clinical_from)}).</p>\n</section>")


def _points(records: list[dict], x_key: str, y_key: str, start: float = 0.0, scale: float = 1.0) -> list:
    return thin([((r[x_key] - start) / scale, r[y_key]) for r in records
                 if number(r.get(x_key)) is not None and number(r.get(y_key)) is not None])


def _score_chart(chart_id: str, key: str, label: str, records: list[dict], epochs: dict[int, dict],
                 best: int | None) -> str:
    rows = [dict(v, epoch=e) for e, v in sorted(epochs.items())]
    series = [Series("val", _points(rows, "epoch", f"val/{key}"), PALETTE[0]),
              Series("test", _points(rows, "epoch", f"test/{key}"), PALETTE[1])]
    best_test = number(_last(records, f"best_test/{key}"))
    if best_test is not None and best:
        series.append(Series("test, best model", [(float(best), best_test)], PALETTE[2], line=False))
    levels = [Level(value, "baseline val", "#6e7781") for value in [number(_last(records, f"baseline_val/{key}"))]
              if value is not None]
    markers = [Marker(float(best), f"best epoch {best}")] if best and series[0].points else []
    missing = ("no findings labels on this data set" if key.startswith("findings") and any(
        "val/BLEU_4" in r for r in records) else "no evaluation yet")
    svg = line_chart(f"{label} per epoch", "epoch", label, series, "split", markers, levels, missing, y_from_zero=True)
    return img(chart_id, svg, f"Val and test {label} per epoch, the best epoch marked")


def _charts(run: RunFiles, epochs: dict[int, dict], best: int | None) -> str:
    records = run.records
    times = [r["time/unix_s"] for r in records if number(r.get("time/unix_s")) is not None]
    start = min(times) if times else 0.0
    rows = [dict(v, epoch=e) for e, v in sorted(epochs.items())]
    on_gpu = run.plan.get("device") == "cuda" or any("memory/allocated_gib" in r for r in records)

    def timed(title: str, y_label: str, keys: tuple[tuple[str, str], ...], missing: str,
              levels: list[Level] = ()) -> str:
        series = [Series(name, _points(records, "time/unix_s", key, start, 60.0), PALETTE[i])
                  for i, (key, name) in enumerate(keys)]
        return line_chart(title, "minutes since the first record", y_label, series, "", levels=levels,
                          missing=missing, y_from_zero=True)

    budget = number(run.plan.get("memory_budget_gib"))
    no_gpu = "no GPU readings (a CPU run)" if not on_gpu else "no readings yet"
    images = [
        img("chart-loss-step", line_chart("Train loss per step", "step", "loss",
                                          [Series("train", _points(records, "step", "train/loss"), PALETTE[0])],
                                          missing="no step logged yet (one every --log-every steps)"),
            "Train loss per logged step"),
        img("chart-loss-epoch", line_chart("Loss per epoch", "epoch", "loss", [
            Series("train", _points(rows, "epoch", "train/loss_epoch"), PALETTE[0]),
            Series("val", _points(rows, "epoch", "val/loss"), PALETTE[1]),
            Series("test", _points(rows, "epoch", "test/loss"), PALETTE[2])], "split",
            missing="no epoch finished yet"), "Train, val and test loss per epoch"),
        _score_chart("chart-bleu4", "BLEU_4", "BLEU-4", records, epochs, best),
        _score_chart("chart-cider", "CIDEr", "CIDEr", records, epochs, best),
        _score_chart("chart-findings", "findings_macro_f1", "findings F1", records, epochs, best),
        img("chart-speed", timed("Training throughput", "samples/s", (("perf/samples_per_s", "samples/s"),),
                                 "no step logged yet"), "Training samples per second over time"),
        img("chart-data-wait", timed("Waiting for data", "% of step time", (("perf/data_wait_pct", "data wait"),),
                                     "no step logged yet"), "Share of training time spent waiting for data"),
        img("chart-memory", timed("GPU memory", "GiB", (("memory/allocated_gib", "allocated"),
                                                        ("memory/reserved_gib", "reserved")), no_gpu,
                                  [Level(budget, "plan's budget", "#cf222e")] if budget and on_gpu else []),
            "GPU memory allocated and reserved over time, with the plan's budget"),
        img("chart-gpu-util", timed("GPU utilization", "%", (("gpu/util_pct", "utilization"),), no_gpu),
            "GPU utilization over time"),
        img("chart-probe", _probe_svg(run.plan), "The memory probe's measured peaks, its fitted line and the chosen "
                                                 "micro-batch"),
    ]
    return "<section>\n<h2>Charts</h2>\n<div class=\"charts\">\n" + "\n".join(images) + "\n</div>\n</section>"


def _probe_svg(plan: dict) -> str:
    title = "Memory probe"
    probe = plan.get("probe") if isinstance(plan.get("probe"), dict) else None
    if not probe:
        why = (plan.get("reasons") or {}).get("probe") or "the plan has no probe"
        return line_chart(title, "micro-batch", "peak GiB", [], missing=str(why))
    measured = thin(probe.get("points"))
    chosen = number(probe.get("micro_batch")) or 0.0
    fixed, per_sample = number(probe.get("fixed_gib")), number(probe.get("per_sample_gib"))
    series = [Series("measured", measured, PALETTE[0], line=False)]
    if fixed is not None and per_sample is not None:
        right = max([chosen, *(x for x, _ in measured)] or [1.0])
        series.append(Series("fitted line", [(0.0, fixed), (right, fixed + per_sample * right)], PALETTE[1], dashed=True))
    budget = number(probe.get("budget_gib"))
    return line_chart(title, "micro-batch (studies)", "peak GiB", series, "",
                      [Marker(chosen, f"chosen {chosen:.0f}")] if chosen else [],
                      [Level(budget, "budget", "#cf222e")] if budget else [], "no points measured", y_from_zero=True)


def _plan(plan: dict) -> str:
    """Each decision of plan.json with its value and the reason the plan gives."""
    rows = []
    for section in (plan, plan.get("batch") or {}, plan.get("loader") or {}):
        for name, reason in (section.get("reasons") or {}).items():
            value = section.get(name)
            shown = NA if value is None or isinstance(value, dict) else str(value)
            rows.append(f"<tr><th>{esc(name)}</th><td>{esc(shown)}</td><td class=\"reason\">{esc(reason)}</td></tr>")
    if not rows:
        return "<section>\n<h2>Plan</h2>\n<p class=\"note\">No plan.json yet.</p>\n</section>"
    return ("<section>\n<h2>Plan</h2>\n<div class=\"scroll\"><table id=\"plan\"><thead><tr><th>Decision</th>"
            "<th>Value</th><th>Reason</th></tr></thead>\n<tbody>" + "\n".join(rows) + "</tbody></table></div>\n</section>")


# --- samples ----------------------------------------------------------------------------------

def _thumbnail(path: Path) -> str:
    """A view as an <img> with a PNG data URI, or a note when it cannot be read."""
    from r2gen.data.datasets import open_image
    from r2gen.errors import DataError

    try:
        view = open_image(path).convert("L")  # PNG, JPEG or DICOM
        view.thumbnail((THUMB_PX, THUMB_PX))
        buffer = io.BytesIO()
        view.save(buffer, format="PNG")
    except (OSError, ValueError, DataError):
        return f"<span class=\"note\">{esc(path.name)}: cannot be read</span>"
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src=\"data:image/png;base64,{data}\" alt=\"{esc(path.name)}\">"


def _findings_cells(entry: dict, generated: str) -> tuple[str, str]:
    """The true and the stated findings (the embedded set's labels), the stated ones that disagree marked."""
    from r2gen.data.synth_reports import Findings
    from r2gen.findings import FINDING_NAMES, read_findings

    truth = entry.get("findings")
    if not isinstance(truth, dict):
        return "", ""
    true = Findings(**{k: v for k, v in truth.items() if k in FINDING_NAMES})
    stated = read_findings(generated)
    left = ", ".join(f"{name}: {getattr(true, name)}" for name in FINDING_NAMES)
    right = ", ".join(f"<span class=\"agree\">{name}: {esc(getattr(stated, name))}</span>"
                      if getattr(stated, name) == getattr(true, name) else
                      f"<mark class=\"wrong\">{name}: {esc(getattr(stated, name))}</mark>" for name in FINDING_NAMES)
    return f"<span class=\"findings\">{esc(left)}</span>", f"<span class=\"findings\">{right}</span>"


def _samples(run: RunFiles) -> str:
    if not run.samples:
        return ("<section>\n<h2>Samples</h2>\n<p class=\"note\">No generated reports yet (written at each "
                "evaluation).</p>\n</section>")
    rows = []
    for sample in run.samples:
        study = str(sample.get("id"))
        entry = run.studies.get(study, {})
        paths = entry.get("image_path") or []
        views = "".join(_thumbnail(run.image_dir / p) for p in paths) if run.image_dir else ""
        generated = str(sample.get("generated") or "")
        truth_findings, stated_findings = _findings_cells(entry, generated)
        rows.append(f"<tr><td class=\"id\">{esc(study)}</td><td class=\"views\">{views or NA}</td>"
                    f"<td>{esc(sample.get('ground_truth') or NA)}{truth_findings}</td>"
                    f"<td>{esc(generated or NA)}{stated_findings}</td></tr>")
    note = (f"Studies from {esc(run.samples_from)}: both views, the radiologist's report and the model's."
            + (" Findings read from each report with the embedded set's phrase tables; the generated report's "
               "findings that disagree with the truth are <mark class=\"wrong\">marked</mark>."
               if any("findings" in e for e in run.studies.values()) else ""))
    return ("<section>\n<h2>Samples</h2>\n<p class=\"note\">" + note + "</p>\n<div class=\"scroll\"><table id=\"samples\">"
            "<colgroup><col style=\"width: 10%\"><col style=\"width: 26%\"><col style=\"width: 32%\">"
            "<col style=\"width: 32%\"></colgroup>\n<thead><tr><th>Study</th><th>Views</th><th>Ground truth</th>"
            "<th>Generated</th></tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>\n</section>")
