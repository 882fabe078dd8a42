"""A precision study's summary (study/summary.json) as one self-contained HTML page.

`render_report` turns the summary dict into HTML with no external files, no network and no
JavaScript: the charts (train loss curves, throughput bars, peak memory bars) are hand-drawn SVG
embedded as base64 data URIs, the CSS is inline, and every piece of text from the summary is
escaped with `html.escape` (reports and reasons are user data). `write_report` writes the page
atomically (temp file in the same folder, flush + fsync, `os.replace`).

Any measured value may be null (a CPU run has no GPU utilization and no peak VRAM; METEOR needs
Java); null shows as "n/a" in the table, and a chart whose values are all null says so.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

NA = "n/a"
SVG_NS = "http://www.w3.org/2000/svg"
# One color per done precision, the same in every chart (Okabe-Ito, readable for colour-blind eyes).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
METRICS = (("BLEU_1", "BLEU-1"), ("BLEU_2", "BLEU-2"), ("BLEU_3", "BLEU-3"), ("BLEU_4", "BLEU-4"),
           ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"), ("CIDEr", "CIDEr"))
MAX_CURVE_POINTS = 1500  # longer loss curves are thinned (first and last point kept)

CHART_W, CHART_H = 600, 320
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1280px; padding: 20px 16px; color: #1f2328; background: #fff;
       line-height: 1.45; }
h1 { font-size: 1.6em; margin: 0 0 8px; }
h2 { font-size: 1.2em; margin: 32px 0 10px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.meta dt { font-weight: 600; color: #57606a; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.recommendation { border: 2px solid #1a7f37; background: #dafbe1; border-radius: 8px;
                  padding: 12px 16px; margin: 20px 0; }
.recommendation.none { border-color: #bf8700; background: #fff8c5; }
.recommendation .pick { font-size: 1.3em; font-weight: 700; }
.recommendation .rule { margin: 6px 0 0; color: #32383f; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
#results { font-size: 12px; }
#results th, #results td { padding: 3px 5px; }
#results th { white-space: nowrap; }
#results td.state { min-width: 130px; }
th { background: #f6f8fa; text-align: left; }
#results td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#results tr.recommended td { background: #dafbe1; }
.status { display: inline-block; border-radius: 10px; padding: 0 8px; font-weight: 600; color: #fff; }
.status-done { background: #1a7f37; } .status-skipped { background: #6e7781; }
.status-failed { background: #cf222e; } .status-pending { background: #9a6700; }
.reason { display: block; font-size: 12px; color: #57606a; margin-top: 2px; overflow-wrap: anywhere; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
img.chart { max-width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 6px; }
.note { color: #57606a; font-size: 13px; }
#samples { table-layout: fixed; width: 100%; }
#samples td { white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; }
#samples td.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
"""


def render_report(summary: dict) -> str:
    """A self-contained HTML page (no external files, no network, no JavaScript needed) for a precision study."""
    precisions = [p for p in (summary.get("precisions") or []) if isinstance(p, Mapping)]
    done = [p for p in precisions if p.get("status") == "done"]
    title = str(summary.get("title") or "Precision study")
    body = "\n".join((_header(summary, title), _recommendation(summary, done), _results_table(summary, precisions),
                      _charts(done), _samples(done)))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_report(summary: dict, path: Path) -> Path:
    """Render `summary` to `path`, atomically (the project's one atomic write: r2gen.checkpoint)."""
    from r2gen.atomic import write_text

    write_text(Path(path), render_report(summary))
    return Path(path)


# --- text and numbers -------------------------------------------------------------------------

def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _text(value: object) -> str:
    return NA if value is None else str(value)


def _number(value: object) -> float | None:
    """A real number, or None for null, booleans and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value: object, digits: int) -> str:
    """`value` with `digits` decimals, "n/a" for null; non-numbers are shown as they are (escaped later)."""
    if value is None:
        return NA
    number = _number(value)
    if number is None:
        return str(value)
    if not math.isfinite(number):
        return str(number)
    return f"{number:,.{digits}f}"


def _precision_name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("precision") or "?")


# --- page sections ----------------------------------------------------------------------------

def _header(summary: Mapping[str, Any], title: str) -> str:
    fields = (("Created", "created"), ("Hardware", "hardware"), ("Preset", "preset"), ("Backend", "backend"),
              ("Epochs", "epochs"))
    rows = "".join(f"<dt>{label}</dt><dd>{_esc(_text(summary.get(key)))}</dd>" for label, key in fields)
    return f"<header>\n<h1>{_esc(title)}</h1>\n<dl class=\"meta\">{rows}</dl>\n</header>"


def _recommendation(summary: Mapping[str, Any], done: Sequence[Mapping[str, Any]]) -> str:
    recommended = summary.get("recommended")
    rule = summary.get("rule")
    rule_html = f"<p class=\"rule\"><strong>Rule:</strong> {_esc(rule)}</p>" if rule else ""
    if recommended:
        pick = f"<div class=\"pick\">Recommended precision: {_esc(recommended)}</div>"
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
    ("Micro-\nbatch", _field("micro_batch"), 0), ("Wall\ntime (s)", _field("wall_s"), 1),
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
    cell = f"<span class=\"status status-{css}\">{_esc(status)}</span>"
    reason = entry.get("reason")
    if reason:
        cell += f"<span class=\"reason\">{_esc(reason)}</span>"
    return f"<td class=\"state\">{cell}</td>"


def _results_table(summary: Mapping[str, Any], precisions: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{'<br>'.join(_esc(line) for line in label.splitlines())}</th>" for label, _, _ in COLUMNS)
    rows = []
    for entry in precisions:
        name = _precision_name(entry)
        css = " class=\"recommended\"" if summary.get("recommended") and name == summary.get("recommended") else ""
        run_dir = entry.get("run_dir")
        title = f" title=\"{_esc(run_dir)}\"" if run_dir else ""
        cells = "".join(f"<td class=\"num\">{_esc(_fmt(get(entry), digits))}</td>" for _, get, digits in COLUMNS)
        rows.append(f"<tr{css} data-precision=\"{_esc(name)}\"><th{title}>{_esc(name)}</th>"
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
    parts = [f"BLEU-4 {_fmt(baseline.get('BLEU_4'), 3)}"]
    if baseline.get("findings_macro_f1") is not None:
        parts += [f"findings F1 {_fmt(baseline.get('findings_macro_f1'), 3)}",
                  f"findings exact {_fmt(baseline.get('findings_exact_match'), 3)}"]
    return (f"<p class=\"note\" id=\"baseline\">Constant-report baseline on test (always the most frequent "
            f"train report): {_esc(', '.join(parts))}. Findings: macro F1 over the 8 abnormal findings and the "
            "share of studies with all 5 right, read from each report with the embedded set's phrase tables.</p>\n")


def _charts(done: Sequence[Mapping[str, Any]]) -> str:
    if not done:
        return "<section>\n<h2>Charts</h2>\n<p class=\"note\">No precision finished: no charts to draw.</p>\n</section>"
    names = [_precision_name(p) for p in done]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(done))]

    def series(key: str) -> list[tuple[float | None, str, str]]:
        return [(_number(p.get(key)), name, color) for p, name, color in zip(done, names, colors)]

    curves = [(_curve(p.get("loss_curve")), name, color) for p, name, color in zip(done, names, colors)]
    throughput, memory = series("samples_per_s"), series("peak_vram_gib")
    listed = ", ".join(names)
    images = [
        _img("chart-loss", _loss_svg(curves), f"Train loss per step for {listed}"),
        _img("chart-throughput", _bars_svg("Training throughput", "samples/s", throughput, 1, "no throughput measured"),
             f"Training samples per second for {listed}"),
        _img("chart-memory", _bars_svg("Peak GPU memory", "GiB", memory, 2, "no GPU memory reading (CPU run?)"),
             f"Peak GPU memory in GiB for {listed}"),
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
    head = "".join(f"<th>Generated ({_esc(name)})</th>" for name in names)
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
    generated = "".join(f"<td>{_esc(_text(s.get('generated')))}</td>" for s in found)
    return f"<tr><td class=\"id\">{_esc(study)}</td><td>{_esc(_text(truth))}</td>{generated}</tr>"


# --- SVG charts -------------------------------------------------------------------------------

def _img(chart_id: str, svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (f"<img id=\"{chart_id}\" class=\"chart\" src=\"data:image/svg+xml;base64,{data}\" "
            f"width=\"{CHART_W}\" height=\"{CHART_H}\" alt=\"{_esc(alt)}\">")


def _curve(raw: object) -> list[tuple[float, float]]:
    """[step, loss] pairs with finite numbers, thinned to MAX_CURVE_POINTS."""
    points = []
    for item in raw if isinstance(raw, Sequence) and not isinstance(raw, str) else []:
        if isinstance(item, Sequence) and len(item) >= 2:
            x, y = _number(item[0]), _number(item[1])
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                points.append((x, y))
    if len(points) > MAX_CURVE_POINTS:
        stride = math.ceil(len(points) / MAX_CURVE_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def _ticks(lo: float, hi: float, integer: bool = False, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]; a zero-width range is widened, never divided by."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = 1.0 if integer else (abs(lo) * 0.1 or 1.0)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = float(max(1, round(step)))
    start, end = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(int(round((end - start) / step)) + 1)]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    digits = next((d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6), 6)
    return f"{value:.{digits}f}"


def _svg(title: str, body: str) -> str:
    return (f"<svg xmlns=\"{SVG_NS}\" width=\"{CHART_W}\" height=\"{CHART_H}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" "
            "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">"
            f"<rect width=\"{CHART_W}\" height=\"{CHART_H}\" fill=\"#ffffff\"/>"
            f"<text x=\"{CHART_W / 2:.0f}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\" "
            f"fill=\"#1f2328\">{_esc(title)}</text>{body}</svg>")


def _message_svg(title: str, message: str) -> str:
    return _svg(title, f"<text x=\"{CHART_W / 2:.0f}\" y=\"{CHART_H / 2:.0f}\" text-anchor=\"middle\" font-size=\"16\" "
                       f"fill=\"#57606a\">{_esc(message)}</text>")


class _Frame:
    """A plot area inside the chart: data coordinates to pixels, plus axes, grid and labels."""

    def __init__(self, left: float, right: float, top: float, bottom: float,
                 xs: Sequence[float], ys: Sequence[float]) -> None:
        self.left, self.right, self.top, self.bottom = left, right, top, bottom
        self.xs, self.ys = list(xs), list(ys)

    def px(self, x: float) -> float:
        lo, hi = self.xs[0], self.xs[-1]
        if hi <= lo:
            return (self.left + self.right) / 2
        return self.left + (x - lo) / (hi - lo) * (self.right - self.left)

    def py(self, y: float) -> float:
        lo, hi = self.ys[0], self.ys[-1]
        if hi <= lo:
            return (self.top + self.bottom) / 2
        return self.bottom - (y - lo) / (hi - lo) * (self.bottom - self.top)

    def y_axis(self, label: str) -> str:
        parts = []
        for y in self.ys:
            py = self.py(y)
            parts.append(f"<line x1=\"{self.left:.1f}\" y1=\"{py:.1f}\" x2=\"{self.right:.1f}\" y2=\"{py:.1f}\" "
                         "stroke=\"#e5e7eb\"/>"
                         f"<text x=\"{self.left - 8:.1f}\" y=\"{py + 4:.1f}\" text-anchor=\"end\" fill=\"#444\">"
                         f"{_tick_label(y, self.ys)}</text>")
        mid = (self.top + self.bottom) / 2
        parts.append(f"<text x=\"16\" y=\"{mid:.1f}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {mid:.1f})\" "
                     f"font-size=\"13\" fill=\"#1f2328\">{_esc(label)}</text>")
        parts.append(f"<line x1=\"{self.left:.1f}\" y1=\"{self.top:.1f}\" x2=\"{self.left:.1f}\" "
                     f"y2=\"{self.bottom:.1f}\" stroke=\"#333\"/>"
                     f"<line x1=\"{self.left:.1f}\" y1=\"{self.bottom:.1f}\" x2=\"{self.right:.1f}\" "
                     f"y2=\"{self.bottom:.1f}\" stroke=\"#333\"/>")
        return "".join(parts)

    def x_axis(self, label: str) -> str:
        parts = []
        for x in self.xs:
            px = self.px(x)
            parts.append(f"<line x1=\"{px:.1f}\" y1=\"{self.bottom:.1f}\" x2=\"{px:.1f}\" y2=\"{self.bottom + 5:.1f}\" "
                         f"stroke=\"#333\"/><text x=\"{px:.1f}\" y=\"{self.bottom + 19:.1f}\" text-anchor=\"middle\" "
                         f"fill=\"#444\">{_tick_label(x, self.xs)}</text>")
        parts.append(self.x_label(label))
        return "".join(parts)

    def x_label(self, label: str) -> str:
        return (f"<text x=\"{(self.left + self.right) / 2:.1f}\" y=\"{self.bottom + 40:.1f}\" text-anchor=\"middle\" "
                f"font-size=\"13\" fill=\"#1f2328\">{_esc(label)}</text>")


def _loss_svg(curves: Sequence[tuple[list[tuple[float, float]], str, str]]) -> str:
    title = "Train loss"
    drawn = [(points, name, color) for points, name, color in curves if points]
    if not drawn:
        return _message_svg(title, "n/a: no loss curve recorded" if curves else "n/a: no precision finished")
    xs = [x for points, _, _ in drawn for x, _ in points]
    ys = [y for points, _, _ in drawn for _, y in points]
    integer = all(float(x).is_integer() for x in xs)
    frame = _Frame(70, CHART_W - 150, 40, CHART_H - 56, _ticks(min(xs), max(xs), integer), _ticks(min(ys), max(ys)))
    parts = [frame.y_axis("loss"), frame.x_axis("step")]
    for points, _, color in drawn:
        coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
        if len(points) > 1:
            parts.append(f"<polyline points=\"{coords}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" "
                         "stroke-linejoin=\"round\"/>")
        if len(points) <= 40:
            parts.extend(f"<circle cx=\"{frame.px(x):.1f}\" cy=\"{frame.py(y):.1f}\" r=\"3.5\" fill=\"{color}\"/>"
                         for x, y in points)
    parts.append(_legend(CHART_W - 136, 48, [(name, color) for _, name, color in curves],
                         [bool(points) for points, _, _ in curves]))
    return _svg(title, "".join(parts))


def _legend(x: float, y: float, entries: Sequence[tuple[str, str]], present: Sequence[bool]) -> str:
    parts = [f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" font-weight=\"bold\" fill=\"#1f2328\">precision</text>"]
    for i, ((name, color), shown) in enumerate(zip(entries, present)):
        row = y + 20 + i * 20
        label = name if len(name) <= 14 else name[:13] + "\u2026"
        label += "" if shown else " (n/a)"
        parts.append(f"<line x1=\"{x:.1f}\" y1=\"{row - 4:.1f}\" x2=\"{x + 22:.1f}\" y2=\"{row - 4:.1f}\" "
                     f"stroke=\"{color}\" stroke-width=\"3\"/><text x=\"{x + 28:.1f}\" y=\"{row:.1f}\" "
                     f"fill=\"#1f2328\">{_esc(label)}</text>")
    return "".join(parts)


def _bars_svg(title: str, unit: str, bars: Sequence[tuple[float | None, str, str]], digits: int, missing: str) -> str:
    """One bar per precision with its value on top; "n/a" where the value is null."""
    if not bars:
        return _message_svg(title, "n/a: no precision finished")
    values = [v for v, _, _ in bars if v is not None and math.isfinite(v)]
    if not values:
        return _message_svg(title, f"n/a: {missing}")
    ceiling = max(0.0, *values) * 1.08 or 1.0  # headroom for the value labels; all zeros still get an axis
    frame = _Frame(70, CHART_W - 24, 40, CHART_H - 56, [0.0, 1.0], _ticks(min(0.0, *values), ceiling))
    slot = (frame.right - frame.left) / len(bars)
    parts = [frame.y_axis(unit)]
    parts.extend(_bar(frame, frame.left + slot * (i + 0.5), min(90.0, slot * 0.6), bar, digits)
                 for i, bar in enumerate(bars))
    parts.append(frame.x_label("precision"))
    return _svg(title, "".join(parts))


def _bar(frame: _Frame, center: float, width: float, bar: tuple[float | None, str, str], digits: int) -> str:
    value, name, color = bar
    label = name if len(name) <= 18 else name[:17] + "\u2026"
    out = (f"<text x=\"{center:.1f}\" y=\"{frame.bottom + 19:.1f}\" text-anchor=\"middle\" "
           f"fill=\"#1f2328\">{_esc(label)}</text>")
    zero = frame.py(0.0)
    if value is None or not math.isfinite(value):
        return out + (f"<text x=\"{center:.1f}\" y=\"{zero - 8:.1f}\" text-anchor=\"middle\" "
                      f"fill=\"#57606a\">{NA}</text>")
    top, bottom = sorted((frame.py(value), zero))
    return out + (f"<rect x=\"{center - width / 2:.1f}\" y=\"{top:.1f}\" width=\"{width:.1f}\" "
                  f"height=\"{max(bottom - top, 1.0):.1f}\" fill=\"{color}\"/>"
                  f"<text x=\"{center:.1f}\" y=\"{top - 6:.1f}\" text-anchor=\"middle\" font-weight=\"bold\" "
                  f"fill=\"#1f2328\">{_fmt(value, digits)}</text>")
