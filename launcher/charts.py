"""The one drawing path of the HTML reports (a precision study's, a run's): self-contained pages.

Charts are hand-drawn SVG embedded as base64 data URIs (`img`), the CSS is inline, and every piece
of text is escaped (`esc`: reports, reasons and names are user data). No external files, no network,
no JavaScript. A chart with nothing to draw says why in its middle ("n/a: ...") instead of vanishing,
so a page always has the same charts in the same places.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

NA = "n/a"
SVG_NS = "http://www.w3.org/2000/svg"
# One color per series, the same in every chart of a page (Okabe-Ito, readable for colour-blind eyes).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MAX_CURVE_POINTS = 1500  # longer curves are thinned (first and last point kept)
CHART_W, CHART_H = 600, 320

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 0 auto; max-width: 1280px; padding: 20px 16px; color: #1f2328; background: #fff;
       line-height: 1.45; }
h1 { font-size: 1.6em; margin: 0 0 8px; }
h2 { font-size: 1.2em; margin: 32px 0 10px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.meta dt { font-weight: 600; color: #57606a; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
img.chart { max-width: 100%; height: auto; border: 1px solid #d0d7de; border-radius: 6px; }
.note { color: #57606a; font-size: 13px; }
.status { display: inline-block; border-radius: 10px; padding: 0 8px; font-weight: 600; color: #fff; }  /* a status badge; each page colours its own */
#samples { table-layout: fixed; width: 100%; }
#samples td { white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; }
#samples td.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
"""


def page(title: str, css: str, body: str) -> str:
    """A whole HTML document: BASE_CSS plus the page's own `css`, and `body`."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{BASE_CSS}{css}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# --- text and numbers -------------------------------------------------------------------------

def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def text(value: object) -> str:
    return NA if value is None else str(value)


def number(value: object) -> float | None:
    """A real number, or None for null, booleans and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def fmt(value: object, digits: int) -> str:
    """`value` with `digits` decimals, "n/a" for null; non-numbers are shown as they are (escape them)."""
    if value is None:
        return NA
    found = number(value)
    if found is None:
        return str(value)
    if not math.isfinite(found):
        return str(found)
    return f"{found:,.{digits}f}"


def img(chart_id: str, svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (f"<img id=\"{chart_id}\" class=\"chart\" src=\"data:image/svg+xml;base64,{data}\" "
            f"width=\"{CHART_W}\" height=\"{CHART_H}\" alt=\"{esc(alt)}\">")


def thin(raw: object) -> list[tuple[float, float]]:
    """(x, y) pairs of finite numbers from [x, y] items, thinned to MAX_CURVE_POINTS."""
    points = []
    for item in raw if isinstance(raw, Sequence) and not isinstance(raw, str) else []:
        if isinstance(item, Sequence) and len(item) >= 2:
            x, y = number(item[0]), number(item[1])
            if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
                points.append((x, y))
    if len(points) > MAX_CURVE_POINTS:
        stride = math.ceil(len(points) / MAX_CURVE_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


# --- chart elements ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One line of a chart: a polyline (dots where it has few points; none on a dashed one, a fitted line),
    or dots alone (`line=False`)."""
    name: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False
    line: bool = True


@dataclass(frozen=True)
class Marker:
    """A vertical line at `x` (the best epoch, the chosen micro-batch), labelled at its top."""
    x: float
    label: str
    color: str = "#57606a"


@dataclass(frozen=True)
class Level:
    """A horizontal dashed line at `y` (a baseline, a memory budget), in the legend."""
    y: float
    label: str
    color: str = "#57606a"


def ticks(lo: float, hi: float, integer: bool = False, count: int = 5) -> list[float]:
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


def _tick_label(value: float, marks: Sequence[float]) -> str:
    step = abs(marks[1] - marks[0]) if len(marks) > 1 else 1.0
    digits = next((d for d in range(7) if abs(step * 10 ** d - round(step * 10 ** d)) < 1e-6), 6)
    return f"{value:.{digits}f}"


def _svg(title: str, body: str) -> str:
    return (f"<svg xmlns=\"{SVG_NS}\" width=\"{CHART_W}\" height=\"{CHART_H}\" viewBox=\"0 0 {CHART_W} {CHART_H}\" "
            "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">"
            f"<rect width=\"{CHART_W}\" height=\"{CHART_H}\" fill=\"#ffffff\"/>"
            f"<text x=\"{CHART_W / 2:.0f}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\" "
            f"fill=\"#1f2328\">{esc(title)}</text>{body}</svg>")


def message_svg(title: str, message: str) -> str:
    """A chart with nothing to draw: its title and why, in the middle."""
    return _svg(title, f"<text x=\"{CHART_W / 2:.0f}\" y=\"{CHART_H / 2:.0f}\" text-anchor=\"middle\" font-size=\"16\" "
                       f"fill=\"#57606a\">{esc(message)}</text>")


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
                     f"font-size=\"13\" fill=\"#1f2328\">{esc(label)}</text>")
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
                f"font-size=\"13\" fill=\"#1f2328\">{esc(label)}</text>")


def line_chart(title: str, x_label: str, y_label: str, series: Sequence[Series], legend: str = "",
               markers: Sequence[Marker] = (), levels: Sequence[Level] = (), missing: str = "nothing recorded",
               y_from_zero: bool = False) -> str:
    """Lines (or dots) over a shared x axis, with optional vertical markers and horizontal levels; the
    legend names every series and level (a series without points says "(n/a)")."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return message_svg(title, f"{NA}: {missing}")
    xs = [x for s in drawn for x, _ in s.points] + [m.x for m in markers]
    ys = [y for s in drawn for _, y in s.points] + [level.y for level in levels]
    y_lo, y_hi = min(ys), max(ys)
    if y_from_zero and y_lo >= 0:  # a rate or a score: the axis starts at 0, and all zeros still get 0..1
        y_lo, y_hi = 0.0, y_hi if y_hi > 0 else 1.0
    integer = all(float(x).is_integer() for x in xs)
    frame = _Frame(70, CHART_W - 150, 40, CHART_H - 56, ticks(min(xs), max(xs), integer), ticks(y_lo, y_hi))
    parts = [frame.y_axis(y_label), frame.x_axis(x_label)]
    for level in levels:
        py = frame.py(level.y)
        parts.append(f"<line x1=\"{frame.left:.1f}\" y1=\"{py:.1f}\" x2=\"{frame.right:.1f}\" y2=\"{py:.1f}\" "
                     f"stroke=\"{level.color}\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>")
    for marker in markers:
        px = frame.px(marker.x)
        right_half = px > (frame.left + frame.right) / 2  # the label on the side with room: never over the legend
        parts.append(f"<line x1=\"{px:.1f}\" y1=\"{frame.top:.1f}\" x2=\"{px:.1f}\" y2=\"{frame.bottom:.1f}\" "
                     f"stroke=\"{marker.color}\" stroke-width=\"1.5\" stroke-dasharray=\"2 3\"/>"
                     f"<text x=\"{px - 4 if right_half else px + 4:.1f}\" y=\"{frame.top + 12:.1f}\" "
                     f"text-anchor=\"{'end' if right_half else 'start'}\" fill=\"{marker.color}\">{esc(marker.label)}</text>")
    for s in drawn:
        coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in s.points)
        if s.line and len(s.points) > 1:
            dash = " stroke-dasharray=\"6 4\"" if s.dashed else ""
            parts.append(f"<polyline points=\"{coords}\" fill=\"none\" stroke=\"{s.color}\" stroke-width=\"2\" "
                         f"stroke-linejoin=\"round\"{dash}/>")
        if not s.line or (len(s.points) <= 40 and not s.dashed):  # a dashed line is a fit: no data points
            radius = 4.5 if not s.line else 3.5
            parts.extend(f"<circle cx=\"{frame.px(x):.1f}\" cy=\"{frame.py(y):.1f}\" r=\"{radius}\" fill=\"{s.color}\"/>"
                         for x, y in s.points)
    entries = [(s.name + ("" if s.points else f" ({NA})"), s.color, s.dashed) for s in series]
    entries += [(level.label, level.color, True) for level in levels]
    parts.append(_legend(CHART_W - 136, 48, legend, entries))
    return _svg(title, "".join(parts))


def _legend(x: float, y: float, title: str, entries: Sequence[tuple[str, str, bool]]) -> str:
    parts = [f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" font-weight=\"bold\" fill=\"#1f2328\">{esc(title)}</text>"]
    for i, (name, color, dashed) in enumerate(entries):
        row = y + 20 + i * 20
        label = name if len(name) <= 16 else name[:15] + "\u2026"
        dash = " stroke-dasharray=\"5 3\"" if dashed else ""
        parts.append(f"<line x1=\"{x:.1f}\" y1=\"{row - 4:.1f}\" x2=\"{x + 22:.1f}\" y2=\"{row - 4:.1f}\" "
                     f"stroke=\"{color}\" stroke-width=\"3\"{dash}/><text x=\"{x + 28:.1f}\" y=\"{row:.1f}\" "
                     f"fill=\"#1f2328\">{esc(label)}</text>")
    return "".join(parts)


def bar_chart(title: str, unit: str, x_label: str, bars: Sequence[tuple[float | None, str, str]], digits: int,
              missing: str) -> str:
    """One bar per (value, name, color) with its value on top; "n/a" where the value is null."""
    if not bars:
        return message_svg(title, f"{NA}: nothing to compare")
    values = [v for v, _, _ in bars if v is not None and math.isfinite(v)]
    if not values:
        return message_svg(title, f"{NA}: {missing}")
    ceiling = max(0.0, *values) * 1.08 or 1.0  # headroom for the value labels; all zeros still get an axis
    frame = _Frame(70, CHART_W - 24, 40, CHART_H - 56, [0.0, 1.0], ticks(min(0.0, *values), ceiling))
    slot = (frame.right - frame.left) / len(bars)
    parts = [frame.y_axis(unit)]
    parts.extend(_bar(frame, frame.left + slot * (i + 0.5), min(90.0, slot * 0.6), bar, digits)
                 for i, bar in enumerate(bars))
    parts.append(frame.x_label(x_label))
    return _svg(title, "".join(parts))


def _bar(frame: _Frame, center: float, width: float, bar: tuple[float | None, str, str], digits: int) -> str:
    value, name, color = bar
    label = name if len(name) <= 18 else name[:17] + "\u2026"
    out = (f"<text x=\"{center:.1f}\" y=\"{frame.bottom + 19:.1f}\" text-anchor=\"middle\" "
           f"fill=\"#1f2328\">{esc(label)}</text>")
    zero = frame.py(0.0)
    if value is None or not math.isfinite(value):
        return out + (f"<text x=\"{center:.1f}\" y=\"{zero - 8:.1f}\" text-anchor=\"middle\" "
                      f"fill=\"#57606a\">{NA}</text>")
    top, bottom = sorted((frame.py(value), zero))
    return out + (f"<rect x=\"{center - width / 2:.1f}\" y=\"{top:.1f}\" width=\"{width:.1f}\" "
                  f"height=\"{max(bottom - top, 1.0):.1f}\" fill=\"{color}\"/>"
                  f"<text x=\"{center:.1f}\" y=\"{top - 6:.1f}\" text-anchor=\"middle\" font-weight=\"bold\" "
                  f"fill=\"#1f2328\">{fmt(value, digits)}</text>")


def dot_chart(title: str, unit: str, x_label: str, groups: Sequence[tuple[str, str, Sequence[float]]], digits: int,
              missing: str, y_max: float | None = None) -> str:
    """Each group's runs as points (one per seed, spread sideways so equal values stay visible), a line
    from their lowest to their highest and a bar across at their mean, with the mean written above;
    "n/a" for a group without runs. `y_max`: the axis top (a score's 1), else from the data."""
    if not groups:
        return message_svg(title, f"{NA}: nothing to compare")
    values = [v for _, _, runs in groups for v in runs if math.isfinite(v)]
    if not values:
        return message_svg(title, f"{NA}: {missing}")
    top = y_max if y_max is not None else max(0.0, *values) * 1.08 or 1.0
    frame = _Frame(70, CHART_W - 24, 40, CHART_H - 56, [0.0, 1.0], ticks(min(0.0, *values), top))
    slot = (frame.right - frame.left) / len(groups)
    parts = [frame.y_axis(unit)]
    for i, (name, color, runs) in enumerate(groups):
        center = frame.left + slot * (i + 0.5)
        label = name if len(name) <= 18 else name[:17] + "\u2026"
        parts.append(f"<text x=\"{center:.1f}\" y=\"{frame.bottom + 19:.1f}\" text-anchor=\"middle\" "
                     f"fill=\"#1f2328\">{esc(label)}</text>")
        finite = [v for v in runs if math.isfinite(v)]
        if not finite:
            parts.append(f"<text x=\"{center:.1f}\" y=\"{frame.py(0.0) - 8:.1f}\" text-anchor=\"middle\" "
                         f"fill=\"#57606a\">{NA}</text>")
            continue
        low, high, mean = frame.py(min(finite)), frame.py(max(finite)), frame.py(sum(finite) / len(finite))
        parts.append(f"<line x1=\"{center:.1f}\" y1=\"{low:.1f}\" x2=\"{center:.1f}\" y2=\"{high:.1f}\" "
                     f"stroke=\"{color}\" stroke-width=\"2\"/>"
                     f"<line x1=\"{center - 22:.1f}\" y1=\"{mean:.1f}\" x2=\"{center + 22:.1f}\" y2=\"{mean:.1f}\" "
                     f"stroke=\"#1f2328\" stroke-width=\"2\"/>")
        offsets = [(k - (len(finite) - 1) / 2) * 9.0 for k in range(len(finite))]
        parts.extend(f"<circle class=\"seed-point\" cx=\"{center + dx:.1f}\" cy=\"{frame.py(v):.1f}\" r=\"5\" "
                     f"fill=\"{color}\" fill-opacity=\"0.8\" stroke=\"#fff\"/>" for dx, v in zip(offsets, finite))
        parts.append(f"<text x=\"{center + 28:.1f}\" y=\"{mean + 4:.1f}\" font-weight=\"bold\" "
                     f"fill=\"#1f2328\">{fmt(sum(finite) / len(finite), digits)}</text>")
    parts.append(frame.x_label(x_label))
    return _svg(title, "".join(parts))
