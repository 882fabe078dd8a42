"""What the commands print: the plan table, the result table, spinners (plain lines in a log file),
errors as one line with their exit code."""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from r2gen.errors import RunFailed, UsageError

out = Console()
err = Console(stderr=True)


def fail(exc: UsageError) -> None:
    _exit("[bold red]error:[/]", exc)


def _exit(label: str, exc: UsageError | RunFailed) -> None:
    """One line, the label then the error's text as it is ([extras] and paths in brackets stay as typed),
    and the error's exit code."""
    from rich.markup import escape

    err.print(f"{label} {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def status(text: str):
    """A spinner on a terminal; plain lines (start, and how long it took) in a log file, where rich's
    spinner would print nothing."""
    if err.is_terminal:
        with err.status(text):
            yield
        return
    began = time.perf_counter()
    err.print(text, highlight=False, soft_wrap=True)
    yield
    err.print(f"{text.rstrip('.')}: done in {time.perf_counter() - began:.1f} s", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def counting(text: str, total: int, unit: str = "studies"):
    """Yields advance(n): a progress bar on a terminal; plain lines in a log file (every tenth of the
    way and the end, with the rate), where rich's bar would print only at the end."""
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        with Progress(f"[bold]{text}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), "ETA",
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task(text, total=total)
            yield lambda n: bar.advance(task, n)
        return
    began, done, shown = time.perf_counter(), 0, 0

    def advance(n: int) -> None:
        nonlocal done, shown
        done += n
        if done >= total or done - shown >= total / 10:
            shown = done
            rate = done / max(time.perf_counter() - began, 1e-9)
            err.print(f"{text}: {done}/{total} {unit}, {rate:.1f} {unit}/s", highlight=False, soft_wrap=True)

    yield advance


def print_plan(plan) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("decision", "value", "reason"):
        table.add_column(column, overflow="fold")
    for row in plan.rows():
        table.add_row(*row)
    err.print(table)
    for warning in plan.warnings():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_result(result) -> None:
    from r2gen.findings import FINDINGS_KEYS
    from r2gen.scores import SCORE_KEYS

    best = result.best_test if result.best_test and result.best_epoch != result.epochs_run else {}
    columns = [(label, scores) for label, scores in (("val", result.val), ("test", result.test),
                                                    (f"test, epoch {result.best_epoch}", best),
                                                    ("baseline val", result.baseline_val),
                                                    ("baseline test", result.baseline_test)) if scores]
    # Findings scores exist on the embedded set only (its labels); on user data the rows are left out.
    keys = [*SCORE_KEYS, *(k for k in FINDINGS_KEYS if any(s.get(k) is not None for _, s in columns))]
    table = Table(title=f"R2Gen scores after {result.epochs_run} epochs ({result.steps} steps); "
                        f"best val epoch {result.best_epoch}",
                  caption="val and test: the last model; test, epoch N: the best val epoch's (R2Gen's pick); "
                          "baseline: always answering the most frequent train report"
                          + ("; findings_*: read from each report with the embedded set's phrase tables, macro F1 "
                             "over its 8 abnormal findings, exact match of all 5" if len(keys) > len(SCORE_KEYS)
                             else ""))
    table.add_column("score")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for key in keys:
        table.add_row(key, *(fmt(scores.get(key)) for _, scores in columns))
    out.print(table)
    speed = f"train {result.samples_per_s:.1f} samples/s"
    if result.peak_memory_gib is not None:
        speed += f", peak GPU memory {result.peak_memory_gib:.2f} GiB allocated"
    out.print(f"{speed}; run directory: {result.run_dir}", highlight=False)


def guarded(run) -> None:
    """Exit 2 for bad input, 1 (with what was saved) for a run that failed while running, 128 + the
    signal for a run stopped by SIGTERM/Ctrl-C after saving."""
    try:
        run()
    except UsageError as exc:
        fail(exc)
    except RunFailed as exc:
        from r2gen.state import Stopped

        _exit("[bold yellow]stopped:[/]" if isinstance(exc, Stopped) else "[bold red]failed:[/]", exc)


def describe_config(engine) -> str:
    if engine is None:
        return "none (this engine needs no config file)"
    return f"{engine.path} (not written)\n{engine.text}"


def print_probe(probe) -> None:
    """The probe's steps (a launcher.memory_model.ProbeResult): micro-batch, whether it fit, its peak."""
    table = Table(title=f"probe: {probe.gpu}, budget {probe.budget_gib:.1f} GiB "
                        f"(context {probe.overhead_gib:.2f} GiB)", title_justify="left")
    for column in ("micro-batch", "fits", "peak GiB"):
        table.add_column(column, justify="right")
    for micro, fits, peak in probe.tried:
        table.add_row(str(micro), "yes" if fits else "no", "-" if peak is None else f"{peak:.2f}")
    err.print(table)


def print_evaluation(result, split: str) -> None:
    from r2gen.scores import SCORE_KEYS

    table = Table(title=f"{result.checkpoint} (step {result.step}), {split}, beam {result.beam_size}")
    for key in (*SCORE_KEYS, "loss"):
        table.add_column(key, justify="right")
    table.add_row(*(fmt(result.scores.get(k)) for k in (*SCORE_KEYS, "loss")))
    out.print(table)
    out.print(f"{len(result.records)} reports at {result.samples_per_s:.1f} samples/s; written to "
              f"{result.output}", highlight=False)


def print_clinical(scores: dict, title: str, output) -> None:
    """The CE table: each observation's precision, recall, F1, support and AUROC, then macro and micro."""
    table = Table(title=title)
    for column in ("observation", "precision", "recall", "F1", "support", "AUROC"):
        table.add_column(column, justify="left" if column == "observation" else "right")
    for name, o in scores["observations"].items():
        table.add_row(name, fmt(o["precision"]), fmt(o["recall"]), fmt(o["f1"]), str(o["support"]), fmt(o["auroc"]))
    for average in ("macro", "micro"):
        row = scores[average]
        table.add_row(f"[bold]{average}[/]", fmt(row["precision"]), fmt(row["recall"]), fmt(row["f1"]), "",
                      fmt(scores["auroc_mean"]) if average == "macro" else "")
    out.print(table)
    out.print(f"{scores['studies']} studies; written to {output}", highlight=False)


def print_study(summary: dict, request, backend: str) -> None:
    from launcher.spread import shown

    def over_seeds(row: dict, key: str, digits: int) -> str:
        return shown((row.get("spread") or {}).get(key), digits)

    table = Table(title=f"precision study: {summary['hardware']}, {request.preset} preset, {backend}, "
                        f"{len(summary.get('seeds') or [])} seed(s): mean ± standard deviation (runs)")
    for column in ("precision", "status", "samples/s", "peak GiB", "findings F1", "BLEU_4", "time to target s",
                   "vs the best", "wall s"):
        table.add_column(column, justify="right")
    verdicts = summary.get("comparisons") or {}
    for row in summary["precisions"]:
        table.add_row(row["precision"], row["status"] if not row.get("reason") else
                      f"{row['status']}: {row['reason']}", fmt(row.get("samples_per_s")),
                      fmt(row.get("peak_vram_gib")), over_seeds(row, "findings_macro_f1", 3),
                      over_seeds(row, "BLEU_4", 3), over_seeds(row, "time_to_target_s", 0),
                      verdicts.get(row["precision"], "n/a"),
                      "n/a" if row.get("wall_s") is None else f"{row['wall_s']:.0f}")
    out.print(table)
    out.print(f"recommended: {summary['recommended'] or 'none'} ({summary['rule']})", highlight=False)
    out.print(f"report: {request.folder / 'report.html'}; summary: {request.folder / 'summary.json'}",
              highlight=False)


def print_seeds(summary: dict) -> None:
    """A --seeds run's test scores over its seeds, beside the constant-report baseline."""
    from launcher.spread import shown

    def over(key: str) -> str:
        return shown(summary["scores"].get(key))

    table = Table(title=f"test scores over {len(summary['seeds'])} seeds ({', '.join(map(str, summary['seeds']))}): "
                        "mean ± standard deviation (runs)")
    for column in ("score", "model", "constant-report baseline"):
        table.add_column(column, justify="left" if column == "score" else "right")
    for key in dict.fromkeys(k.split("/", 1)[1] for k in summary["scores"]):  # in order, once each
        if summary["scores"].get(f"test/{key}"):
            table.add_row(key, over(f"test/{key}"), over(f"baseline_test/{key}"))
    out.print(table)
    out.print(f"runs: {', '.join(summary['runs'])}", highlight=False)


def print_env(facts, found: dict, engines: dict, weights: dict) -> None:
    """The machine, the versions found, which engines and precisions can run here, and which ImageNet
    weights torchvision's cache holds."""
    machine = Table(title="machine", title_justify="left")
    for column in ("what", "value"):
        machine.add_column(column)
    for gpu in facts.gpus:
        machine.add_row(f"GPU {gpu.index}", f"{gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]}, "
                                            f"{gpu.total_gib:.1f} GiB ({gpu.free_gib:.1f} free)")
    if not facts.gpus:
        machine.add_row("GPU", f"none ({facts.gpu_note})")
    h = facts.host
    machine.add_row("host", f"{h.usable_cpus} usable CPUs, {h.ram_total_gib:.1f} GiB RAM ({h.ram_available_gib:.1f} "
                            f"available), swap {h.swap_used_gib:.1f} of {h.swap_total_gib:.1f} GiB in use")
    out.print(machine)
    table = Table(title="versions", title_justify="left")
    for column in ("package", "version"):
        table.add_column(column)
    for name, version in found.items():
        table.add_row(name, version or "not installed")
    out.print(table)
    usable_table = Table(title="engines and precisions usable here", title_justify="left")
    usable_table.add_column("engine")
    for precision in ("fp32", "bf16", "fp16", "fp8"):
        usable_table.add_column(precision)
    for engine, verdicts in engines.items():
        usable_table.add_row(engine, *(verdicts.get(p, "-") for p in ("fp32", "bf16", "fp16", "fp8")))
    out.print(usable_table)
    cache = Table(title="ImageNet weights in torchvision's cache (runs start from them)", title_justify="left")
    for column in ("backbone", "weights"):
        cache.add_column(column, overflow="fold")
    for backbone, where in weights.items():
        cache.add_row(backbone, f"present: {where['path']}" if where["present"] else
                      f"absent (runs start from random weights unless --visual-weights); "
                      f"`r2gen-launch weights import FILE` puts them at {where['path']}")
    out.print(cache)
