"""Where a profiled step's GPU time goes, from its Chrome trace (bench/profile_step.py --trace FILE).

Prints, for the GPU kernels in the trace: per CUDA stream the kernels, their summed time and the time that
stream was busy; for the whole step its span (first kernel's start to last kernel's end), the time some
kernel ran (the union over streams) and the idle remainder; kernels by duration (how many are tiny: a
launch-bound step is many short kernels with gaps); and the kernels with the most launches and the most
time.

    python bench/trace_summary.py trace.json [--top 15]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

BUCKETS_US = (2, 5, 10, 20, 50, 100, 1000)


def kernels(trace: dict) -> list[tuple[str, int, float, float]]:
    """(name, stream, start us, duration us) of every GPU kernel in a Chrome trace."""
    out = []
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") == "kernel":
            stream = event.get("args", {}).get("stream", event.get("tid"))
            out.append((event["name"], int(stream), float(event["ts"]), float(event["dur"])))
    return out


def busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summary(found: list[tuple[str, int, float, float]], top: int) -> list[Table]:
    by_stream: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for _, stream, start, dur in found:
        by_stream[stream].append((start, start + dur))
    span = max(s + d for _, _, s, d in found) - min(s for _, _, s, _ in found)
    union = busy([iv for ivs in by_stream.values() for iv in ivs])
    streams = Table(title=f"{len(found):,} kernels; span {span / 1000:.2f} ms, some kernel running "
                          f"{union / 1000:.2f} ms, idle {(span - union) / 1000:.2f} ms")
    for column in ("stream", "kernels", "kernel ms (sum)", "busy ms", "first-last ms"):
        streams.add_column(column, justify="right")
    for stream, ivs in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        streams.add_row(str(stream), f"{len(ivs):,}", f"{sum(e - s for s, e in ivs) / 1000:.2f}",
                        f"{busy(ivs) / 1000:.2f}", f"{(max(e for _, e in ivs) - min(s for s, _ in ivs)) / 1000:.2f}")
    sizes = Table(title="kernels by duration")
    for column in ("duration", "kernels", "their ms"):
        sizes.add_column(column, justify="right")
    low = 0.0
    for high in (*BUCKETS_US, float("inf")):
        chosen = [d for *_, d in found if low <= d < high]
        label = f"{low:g}-{high:g} us" if high != float("inf") else f">= {low:g} us"
        sizes.add_row(label, f"{len(chosen):,}", f"{sum(chosen) / 1000:.2f}")
        low = high
    names: dict[str, list[float]] = defaultdict(list)
    for name, _, _, dur in found:
        names[name].append(dur)
    tables = [streams, sizes]
    for title, key in (("most launched", lambda kv: -len(kv[1])), ("most time", lambda kv: -sum(kv[1]))):
        table = Table(title=f"kernels, {title}")
        for column in ("kernel", "launches", "ms", "us each"):
            table.add_column(column, justify="left" if column == "kernel" else "right")
        for name, durs in sorted(names.items(), key=key)[:top]:
            table.add_row(name[:90], f"{len(durs):,}", f"{sum(durs) / 1000:.2f}", f"{sum(durs) / len(durs):.1f}")
        tables.append(table)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a Chrome trace JSON (bench/profile_step.py --trace)")
    parser.add_argument("--top", type=int, default=15, help="kernel names listed")
    args = parser.parse_args()
    try:
        found = kernels(json.loads(args.trace.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        parser.exit(2, f"trace_summary: cannot read {args.trace}: {err}\n")
    if not found:
        parser.exit(2, f"trace_summary: {args.trace} has no GPU kernels (profiled on a CPU?)\n")
    console = Console(width=160)
    for table in summary(found, args.top):
        console.print(table)


if __name__ == "__main__":
    main()
