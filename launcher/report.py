"""A precision study's summary (study/summary.json) as one self-contained HTML page.

`render_report` turns the summary dict into HTML with no external files, no network and no
JavaScript: the charts (each seed's test quality as a point, train loss curves, throughput bars,
peak memory bars) are drawn by
launcher.charts, the drawing path the run report (launcher.run_report) shares. `write_report` writes the page
atomically (temp file in the same folder, flush + fsync, `os.replace`).

Any measured value may be null (a CPU run has no GPU utilization and no peak VRAM; METEOR needs
Java); null shows as "n/a" in the table, and a chart whose values are all null says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from launcher.spread import SPREAD_RULE, Spread
from launcher.charts import PALETTE, Series, bar_chart, dot_chart, esc, fmt, img, line_chart, number, page, text, thin

METRICS = (("BLEU_1", "BLEU-1"), ("BLEU_2", "BLEU-2"), ("BLEU_3", "BLEU-3"), ("BLEU_4", "BLEU-4"),
           ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"))
CSS = """
.recommendation { border: 2px solid #1a7f37; background: #dafbe1; border-radius: 8px;
                  padding: 12px 16px; margin: 20px 0; }
.recommendation.none { border-color: #bf8700; background: #fff8c5; }
.recommendation .pick { font-size: 1.3em; font-weight: 700; }
.recommendation .rule { margin: 6px 0 0; color: #32383f; overflow-wrap: anywhere; }
#results { font-size: 12px; }
#results th, #results td { padding: 3px 5px; }
#results th { white-space: nowrap; }
#results td.state { min-width: 130px; }
#results tr.recommended td { background: #dafbe1; }
.status-done { background: #1a7f37; } .status-skipped { background: #6e7781; }
.status-failed { background: #cf222e; } .status-pending { background: #9a6700; }
#seeds td, #seeds th { padding: 3px 8px; }
.verdict-outside { color: #cf222e; font-weight: 600; } .verdict-within, .verdict-best { color: #1a7f37; }
.reason { display: block; font-size: 12px; color: #57606a; margin-top: 2px; overflow-wrap: anywhere; }
"""


def render_report(summary: dict) -> str:
    """A self-contained HTML page (no external files, no network, no JavaScript needed) for a precision study."""
    precisions = [p for p in (summary.get("precisions") or []) if isinstance(p, Mapping)]
    done = [p for p in precisions if p.get("status") == "done"]
    title = str(summary.get("title") or "Precision study")
    body = "\n".join((_header(summary, title), _recommendation(summary, done), _results_table(summary, precisions),
                      _over_seeds(summary, done), _charts(done), _samples(done)))
    return page(title, CSS, body)


def write_report(summary: dict, path: Path) -> Path:
    """Render `summary` to `path`, atomically (the project's one atomic write: r2gen.checkpoint)."""
    from r2gen.atomic import write_text

    write_text(Path(path), render_report(summary))
    return Path(path)


def _precision_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("precision") or "?")


# --- page sections ----------------------------------------------------------------------------

def _header(summary: Mapping[str, Any], title: str) -> str:
    fields = (("Created", "created"), ("Hardware", "hardware"), ("Preset", "preset"), ("Backend", "backend"),
              ("Epochs", "epochs"), ("Seeds", "seeds"))
    rows = "".join(f"<dt>{label}</dt><dd>{esc(text(summary.get(key)))}</dd>" for label, key in fields)
    return f"<header>\n<h1>{esc(title)}</h1>\n<dl class=\"meta\">{rows}</dl>\n</header>"


def _recommendation(summary: Mapping[str, Any], done: Sequence[Mapping[str, Any]]) -> str:
    recommended = summary.get("recommended")
    rule = summary.get("rule")
    rule_html = f"<p class=\"rule\"><strong>Rule:</strong> {esc(rule)}</p>" if rule else ""
    if recommended:
        pick = f"<div class=\"pick\">Recommended precision: {esc(recommended)}</div>"
        return f"<section id=\"recommendation\" class=\"recommendation\">{pick}{rule_html}</section>"
    why = ("No precision finished, so there is no recommendation." if not done
           else "No precision met the rule, so there is no recommendation.")
    return (f"<section id=\"recommendation\" class=\"recommendation none\"><div class=\"pick\">{why}</div>"
            f"{rule_html}</section>")


Column = tuple[str, Callable[[Mapping[str, Any]], object], int]


def _metric(key: str, group: str = "metrics") -> Callable[[Mapping[str, Any]], object]:
    def get(entry: Mapping[str, Any]) -> object:
        metrics = entry.get(group)
        return metrics.get(key) if isinstance(metrics, Mapping) else None
    return get


def _field(key: str) -> Callable[[Mapping[str, Any]], object]:
    return lambda entry: entry.get(key)


# (header, with "\n" where it breaks; value getter; decimals). Scores and losses to 3 decimals, as R2Gen reports them.
COLUMNS: tuple[Column, ...] = (
    ("Seeds", lambda entry: len(entry.get("seeds") or []) or None, 0),
    ("Micro-\nbatch", _field("micro_batch"), 0), ("Wall\ntime (s)", _field("wall_s"), 1),
    ("Time to\nF1 target (s)", _field("time_to_target_s"), 0),
    ("Samples/s", _field("samples_per_s"), 1), ("Peak\nVRAM\n(GiB)", _field("peak_vram_gib"), 2),
    ("GPU\nutil (%)", _field("gpu_util_pct"), 0), ("Train\nloss", _field("train_loss"), 3),
    ("Val\nloss", _field("val_loss"), 3), ("Test\nloss", _field("test_loss"), 3),
    *((label, _metric(key), 3) for key, label in METRICS),
    ("Findings\nF1", _metric("findings_macro_f1", "findings"), 3),
    ("Findings\nexact", _metric("findings_exact_match", "findings"), 3),
    ("Generation\nsamples/s", _field("generation_samples_per_s"), 1),
)


def _status_cell(entry: Mapping[str, Any]) -> str:
    status = str(entry.get("status") or "pending")
    css = status if status in ("done", "skipped", "failed", "pending") else "pending"
    cell = f"<span class=\"status status-{css}\">{esc(status)}</span>"
    reason = entry.get("reason") or (entry.get("engine") if status == "done" else None)  # what ran, e.g. FP8's impl
    if reason:
        cell += f"<span class=\"reason\">{esc(reason)}</span>"
    return f"<td class=\"state\">{cell}</td>"


def _results_table(summary: Mapping[str, Any], precisions: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{'<br>'.join(esc(line) for line in label.splitlines())}</th>" for label, _, _ in COLUMNS)
    rows = []
    for entry in precisions:
        name = _precision_name(entry)
        css = " class=\"recommended\"" if summary.get("recommended") and name == summary.get("recommended") else ""
        run_dir = entry.get("run_dir")
        title = f" title=\"{esc(run_dir)}\"" if run_dir else ""
        cells = "".join(f"<td class=\"num\">{esc(fmt(get(entry), digits))}</td>" for _, get, digits in COLUMNS)
        rows.append(f"<tr{css} data-precision=\"{esc(name)}\"><th{title}>{esc(name)}</th>"
                    f"{_status_cell(entry)}{cells}</tr>")
    if not rows:
        rows.append(f"<tr><td colspan=\"{len(COLUMNS) + 2}\">No precision was asked for.</td></tr>")
    return ("<section>\n<h2>Results</h2>\n<div class=\"scroll\"><table id=\"results\">\n"
            f"<thead><tr><th>Precision</th><th>Status</th>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table></div>\n" + _baseline_note(precisions) + "</section>")


def _baseline_note(precisions: Sequence[Mapping[str, Any]]) -> str:
    """The constant-report baseline on test (the same data for every precision: the first run's)."""
    baseline = next((p["baseline"] for p in precisions if isinstance(p.get("baseline"), Mapping)), None)
    if not baseline or baseline.get("BLEU_4") is None:
        return ""
    parts = [f"BLEU-4 {fmt(baseline.get('BLEU_4'), 3)}"]
    if baseline.get("findings_macro_f1") is not None:
        parts += [f"findings F1 {fmt(baseline.get('findings_macro_f1'), 3)}",
                  f"findings exact {fmt(baseline.get('findings_exact_match'), 3)}"]
    return (f"<p class=\"note\" id=\"baseline\">Constant-report baseline on test (always the most frequent "
            f"train report): {esc(', '.join(parts))}. Findings: macro F1 over the 8 abnormal findings and the "
            "share of studies with all 5 right, read from each report with the embedded set's phrase tables.</p>\n")


SEED_FIGURES = (("findings_macro_f1", "Test findings F1", 3), ("BLEU_4", "Test BLEU-4", 3),
                ("samples_per_s", "Train samples/s", 1), ("time_to_target_s", "Time to F1 target (s)", 0),
                ("peak_vram_gib", "Peak VRAM (GiB)", 2))


def _runs(entry: Mapping[str, Any], key: str) -> list[float]:
    spread = (entry.get("spread") or {}).get(key)
    return [float(v) for v in spread["runs"]] if isinstance(spread, Mapping) else []


def _over_seeds(summary: Mapping[str, Any], done: Sequence[Mapping[str, Any]]) -> str:
    """Each seed's test quality as a point per precision, and every figure as mean ± standard deviation
    (the runs) with the quality's verdict against the best precision's spread."""
    key = str(summary.get("quality_key") or "BLEU_4")
    label = dict((k, name) for k, name, _ in SEED_FIGURES).get(key, key)
    groups = [(_precision_name(p), PALETTE[i % len(PALETTE)], _runs(p, key)) for i, p in enumerate(done)]
    chart = img("chart-seeds", dot_chart(f"{label}, each seed a point", label, "precision", groups, 3,
                                         "no test scores recorded", y_max=1.0),
                f"{label} per seed for {', '.join(name for name, _, _ in groups)}")
    verdicts = summary.get("comparisons") or {}
    head = "".join(f"<th>{esc(name)}</th>" for _, name, _ in SEED_FIGURES)
    rows = []
    for p in done:
        cells = []
        for figure, _, digits in SEED_FIGURES:
            runs = _runs(p, figure)
            if not runs:
                cells.append("<td>n/a</td>")
                continue
            over = Spread(tuple(runs))
            spread = f" ± {fmt(over.std, digits)}" if over.std is not None else ""
            cells.append(f"<td class=\"num\">{fmt(over.mean, digits)}{spread} "
                         f"<span class=\"reason\">({', '.join(fmt(v, digits) for v in runs)})</span></td>")
        verdict = str(verdicts.get(_precision_name(p), "n/a"))
        css = "best" if verdict == "best" else "outside" if verdict.startswith("outside") else "within"
        rows.append(f"<tr data-seeds=\"{esc(_precision_name(p))}\"><th>{esc(_precision_name(p))}</th>"
                    f"{''.join(cells)}<td class=\"verdict-{css}\">{esc(verdict)}</td></tr>")
    if not rows:
        return "<section>\n<h2>Over seeds</h2>\n<p class=\"note\">No precision finished.</p>\n</section>"
    target = summary.get("target_f1")
    note = (f"<p class=\"note\">Mean ± standard deviation over the seeds (each run in brackets); time to target: "
            f"from a run's start to its first val findings F1 at or above {fmt(target, 2)}. Quality against the "
            f"best precision's: {esc(SPREAD_RULE)}.</p>\n")
    return ("<section>\n<h2>Over seeds</h2>\n<div class=\"charts\">" + chart + "</div>\n"
            "<div class=\"scroll\"><table id=\"seeds\">\n"
            f"<thead><tr><th>Precision</th>{head}<th>{esc(label)} vs the best</th></tr></thead>\n<tbody>\n"
            + "\n".join(rows) + "\n</tbody></table></div>\n" + note + "</section>")


def _charts(done: Sequence[Mapping[str, Any]]) -> str:
    if not done:
        return "<section>\n<h2>Charts</h2>\n<p class=\"note\">No precision finished: no charts to draw.</p>\n</section>"
    names = [_precision_name(p) for p in done]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(done))]

    def series(key: str) -> list[tuple[float | None, str, str]]:
        return [(number(p.get(key)), name, color) for p, name, color in zip(done, names, colors)]

    curves = [Series(name, thin(p.get("loss_curve")), color) for p, name, color in zip(done, names, colors)]
    throughput, memory = series("samples_per_s"), series("peak_vram_gib")
    listed = ", ".join(names)
    images = [
        img("chart-loss", line_chart("Train loss", "step", "loss", curves, "precision",
                                     missing="no loss curve recorded"), f"Train loss per step for {listed}"),
        img("chart-throughput", bar_chart("Training throughput", "samples/s", "precision", throughput, 1,
                                          "no throughput measured"), f"Training samples per second for {listed}"),
        img("chart-memory", bar_chart("Peak GPU memory", "GiB", "precision", memory, 2,
                                      "no GPU memory reading (CPU run?)"), f"Peak GPU memory in GiB for {listed}"),
    ]
    note = ""
    if all(value is None for value, _, _ in memory):
        note = "<p class=\"note\">Peak memory is n/a for every precision (no GPU memory reading, e.g. a CPU run).</p>\n"
    return f"<section>\n<h2>Charts</h2>\n{note}<div class=\"charts\">\n" + "\n".join(images) + "\n</div>\n</section>"


def _samples(done: Sequence[Mapping[str, Any]]) -> str:
    by_precision = [{str(s.get("id")): s for s in (p.get("samples") or []) if isinstance(s, Mapping)} for p in done]
    ids: list[str] = []
    for samples in by_precision:
        ids.extend(i for i in samples if i not in ids)
    if not ids:
        why = "no precision finished" if not done else "no precision recorded any"
        return f"<section>\n<h2>Samples</h2>\n<p class=\"note\">No generated reports: {why}.</p>\n</section>"
    names = [_precision_name(p) for p in done]
    head = "".join(f"<th>Generated ({esc(name)})</th>" for name in names)
    rows = "\n".join(_sample_row(study, by_precision) for study in ids)
    width = f"{88.0 / (len(names) + 1):.1f}%"
    cols = "<col style=\"width: 12%\">" + f"<col style=\"width: {width}\">" * (len(names) + 1)
    return ("<section>\n<h2>Samples</h2>\n<p class=\"note\">Test studies: the radiologist's report and each "
            "finished precision's generated report.</p>\n<div class=\"scroll\"><table id=\"samples\">"
            f"<colgroup>{cols}</colgroup>\n<thead><tr><th>Study</th><th>Ground truth</th>{head}</tr></thead>\n"
            f"<tbody>\n{rows}\n</tbody></table></div>\n</section>")


def _sample_row(study: str, by_precision: Sequence[Mapping[str, Mapping[str, Any]]]) -> str:
    """One study: its id, the ground truth (from the first precision that has it), each precision's report."""
    found = [samples.get(study) or {} for samples in by_precision]
    truth = next((s["ground_truth"] for s in found if s.get("ground_truth") is not None), None)
    generated = "".join(f"<td>{esc(text(s.get('generated')))}</td>" for s in found)
    return f"<tr><td class=\"id\">{esc(study)}</td><td>{esc(text(truth))}</td>{generated}</tr>"
