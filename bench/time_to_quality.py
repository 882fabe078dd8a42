"""Time to a good model: the published R2Gen configuration against `r2gen-launch auto`, on the same data.

    python bench/time_to_quality.py --studies 3000 --budget-s 480 --json time_to_quality.json     # one GPU
    python bench/time_to_quality.py --device cpu --preset tiny --studies 60 --budget-s 90           # CPU smoke
    python bench/time_to_quality.py --rows published --json pub.json   # one row per GPU command, then
    python bench/time_to_quality.py --merge pub.json auto.json          # the table of both

Rows, each a plainly started process timed from its start (set-up, caching, evaluation and
checkpoints included), both on the embedded synthetic set of --studies:
- published: the published code's configuration through the shared loop: fp32, batch 16, R2Gen's
  learning rates, images decoded and normalized on the host (no cache, float batches), 2 workers,
  none of the step speed-ups, the published (reference) beam search on val and test after every
  epoch, a resumable checkpoint every epoch. It is slow, so it runs under --budget-s (then stopped
  by SIGTERM, which the loop honours after the step: what it measured so far stays).
- auto: `r2gen-launch auto` as a user types it (plus --studies), under --auto-budget-s if given.

- published-fast: the same configuration (model, batch, learning rates, transforms, seed) with the
  fast evaluation instead of the published beam search, for up to --fast-epochs epochs: its learning
  per epoch is the published configuration's, its wall time is not.

Measured in budget (as before): the target is the best val findings macro-F1 the published row
reached within its budget; each row's time to target is the wall time from its start to its first
val evaluation at or above it, and the ratio is published's time over auto's.

Derived (issue 36): the published configuration's time to --target (0.9) is (the epochs
published-fast took to reach it) x (the published row's measured wall time per epoch: training, its
beam search on val and test, its checkpoint; the mean gap between its epochs' val records),
labelled as derived, beside auto's measured time to the same target; the val F1 of the epochs both
ran is compared as a cross-check (the same training, another decoder). Also each row's last test
findings F1 and BLEU-4 (auto: of its best val epoch's model) and the constant-report baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.run_report import read_records  # noqa: E402 - metrics.jsonl, a cut last line left out

ROWS = ("published", "published-fast", "auto")

PUBLISHED = dict(window_size=16, micro_batch=0, num_workers=2, pin_memory=False, cache_images=False,
                 uint8_images=False, val_every=1, test_every=1, checkpoint_every_min=0.0,
                 reference_generation=True)
"""The published trainer's settings (fp32, no step speed-ups: TrainConfig.without_speedups)."""


def run_published(preset_name: str, device: str, studies: int, epochs: int | None, run_dir: Path,
                  fast: bool = False) -> None:
    """The published configuration's run, in this process (the bench starts it as a child); `fast`: with
    the fast evaluation instead of the published beam search (the published-fast row)."""
    from backends.registry import build_backend
    from r2gen.build import prepare
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.synth import default_dataset
    from r2gen.train import train

    settings = {**PUBLISHED, **({"reference_generation": False} if fast else {})}
    cfg = preset(preset_name).replace(studies=studies, **settings, **({"epochs": epochs} if epochs else {}))
    cfg = cfg.without_speedups()
    annotation = load_annotation(default_dataset(studies=studies))
    prep = prepare(cfg, build_backend("plain", device, "fp32"), annotation, None)
    train(prep, run_dir, Console(stderr=True))


def _timed(cmd: list[str], budget_s: float | None, log: Path) -> float:
    """Run cmd to its end or until budget_s (then SIGTERM, and SIGKILL 30 s later); its start time."""
    began = time.time()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        try:
            child.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return began


def summarize(name: str, run_dir: Path, began: float) -> dict:
    records = read_records(run_dir / "metrics.jsonl")
    evaluated = [r for r in records if r.get("val/findings_macro_f1") is not None]
    curve = [(r["time/unix_s"] - began, r["val/findings_macro_f1"]) for r in evaluated]
    last = {}
    for r in records:
        last.update(r)
    test = "best_test" if "best_test/BLEU_4" in last else "test"
    return {"row": name, "run_dir": str(run_dir), "curve": curve, "val_epochs": [r["epoch"] for r in evaluated],
            "wall_s": (last.get("time/unix_s", began) - began),
            "epochs": last.get("epoch"), "steps": last.get("step"),
            "best_val_f1": max((f for _, f in curve), default=None),
            "test_f1": last.get(f"{test}/findings_macro_f1"), "test_bleu4": last.get(f"{test}/BLEU_4"),
            "baseline_bleu4": last.get("baseline_test/BLEU_4"), "samples_per_s": last.get("perf/train_samples_per_s")}


def time_to(curve: list[tuple[float, float]], target: float | None) -> float | None:
    """Seconds to the first val score at or above target (None: never reached)."""
    if target is None:
        return None
    return next((t for t, f in curve if f >= target), None)


def compare(rows: list[dict]) -> tuple[float | None, float | None]:
    """Each row's time to the published row's best val F1 (set in place); the target and the ratio."""
    by_name = {r["row"]: r for r in rows}
    target = by_name["published"]["best_val_f1"] if "published" in by_name else None
    for row in rows:
        row["time_to_target_s"] = time_to(row["curve"], target)
    times = [by_name.get(name, {}).get("time_to_target_s") for name in ("published", "auto")]
    return target, (times[0] / times[1] if all(times) else None)


def per_epoch_s(row: dict) -> float | None:
    """A row's measured wall time per epoch: the mean gap between its successive epochs' val records
    (each gap one epoch's training, evaluation and checkpoint; start-up excluded), else its first
    epoch's time from the start (one epoch measured)."""
    times, epochs = [t for t, _ in row["curve"]], row.get("val_epochs") or []
    if len(times) >= 2 and len(epochs) == len(times) and epochs[-1] > epochs[0]:
        return (times[-1] - times[0]) / (epochs[-1] - epochs[0])
    return times[0] / epochs[0] if times and epochs else None


def epochs_to(row: dict, target: float) -> int | None:
    """The first epoch whose val findings F1 is at or above target (None: never)."""
    return next((e for e, (_, f) in zip(row.get("val_epochs") or [], row["curve"]) if f >= target), None)


def derive(rows: list[dict], target: float) -> dict | None:
    """The published configuration's derived time to target: published-fast's epochs to it times the
    published row's measured wall time per epoch; auto's measured time to it; their ratio; the largest
    val F1 gap over the epochs both published rows evaluated (the same training, another decoder).
    None without both published rows."""
    by_name = {r["row"]: r for r in rows}
    if not {"published", "published-fast"} <= set(by_name):
        return None
    published, fast = by_name["published"], by_name["published-fast"]
    epoch_s, epochs = per_epoch_s(published), epochs_to(fast, target)
    derived = epochs * epoch_s if epochs is not None and epoch_s is not None else None
    auto = time_to(by_name["auto"]["curve"], target) if "auto" in by_name else None
    both = dict(zip(published.get("val_epochs") or [], (f for _, f in published["curve"])))
    gaps = [abs(both[e] - f) for e, (_, f) in zip(fast.get("val_epochs") or [], fast["curve"]) if e in both]
    return {"target_val_f1": target, "published_s_per_epoch": epoch_s, "epochs_to_target": epochs,
            "published_time_to_target_s": derived, "auto_time_to_target_s": auto,
            "ratio": derived / auto if derived and auto else None,
            "cross_check_max_f1_gap": max(gaps) if gaps else None, "cross_check_epochs": len(gaps)}


def print_table(rows: list[dict], target: float | None, ratio: float | None, title: str) -> None:
    def fmt(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    baseline = next((r["baseline_bleu4"] for r in rows if r["baseline_bleu4"] is not None), None)
    table = Table(title=f"time to val findings-F1 {fmt(target)} (the published row's best within its budget), {title}",
                  caption=f"constant-report baseline: test BLEU-4 {fmt(baseline)}, findings F1 0; ratio "
                          f"published / auto time to target: {fmt(ratio, 1)}x")
    for col in ("row", "time to target s", "wall s", "epochs", "steps", "train samples/s", "best val F1",
                "test findings F1", "test BLEU-4"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(r["row"], fmt(r["time_to_target_s"], 0), fmt(r["wall_s"], 0), str(r["epochs"]), str(r["steps"]),
                      fmt(r["samples_per_s"], 1), fmt(r["best_val_f1"]), fmt(r["test_f1"]), fmt(r["test_bleu4"]))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log file gets the whole table


def print_derived(derived: dict) -> None:
    def fmt(v, d=0):
        return "n/a" if v is None else f"{v:.{d}f}"

    gap = derived["cross_check_max_f1_gap"]
    table = Table(title=f"time to val findings-F1 {derived['target_val_f1']:g}: the published schedule's own clock",
                  caption=f"ratio published (derived) / auto: {fmt(derived['ratio'], 1)}x; cross-check, val F1 of "
                          f"the {derived['cross_check_epochs']} epoch(s) both published rows ran: largest gap "
                          f"{fmt(gap, 3)}")
    for col in ("row", "how", "s per epoch", "epochs to target", "time to target s"):
        table.add_column(col, justify="left" if col in ("row", "how") else "right")
    table.add_row("published", "derived: published-fast's epochs x published's measured s per epoch",
                  fmt(derived["published_s_per_epoch"], 1), fmt(derived["epochs_to_target"]),
                  fmt(derived["published_time_to_target_s"]))
    table.add_row("auto", "measured from its command's start", "", "", fmt(derived["auto_time_to_target_s"]))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=3000, help="embedded synthetic set size")
    parser.add_argument("--preset", default=None, help="published row's preset (default: iu_xray on a GPU, tiny on a CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="rows to run, comma-separated (one per call where one GPU command cannot hold both)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: the table of the rows in these earlier --json files")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall budget of the published row, s")
    parser.add_argument("--auto-budget-s", type=float, default=None, help="wall budget of the auto row, s (default: none)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the published and auto rows (default: each "
                        "preset's)")
    parser.add_argument("--fast-epochs", type=int, default=None,
                        help="epochs of the published-fast row, its cap (default: the preset's)")
    parser.add_argument("--fast-budget-s", type=float, default=None, help="wall budget of the published-fast row, s")
    parser.add_argument("--target", type=float, default=0.9,
                        help="val findings macro-F1 of the derived comparison (published-fast and auto)")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/time_to_quality"), help="where the runs go")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and ratio here")
    parser.add_argument("--row", choices=ROWS[:2], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.merge:
        loaded = [json.loads(path.read_text()) for path in args.merge]
        rows = [row for data in loaded for row in data["rows"]]
        target, ratio = compare(rows)
        derived = derive(rows, args.target)
        print_table(rows, target, ratio, " + ".join(data.get("title", "?") for data in loaded))
        if derived:
            print_derived(derived)
        if args.json:
            args.json.write_text(json.dumps({"target_val_f1": target, "ratio": ratio, "derived": derived,
                                             "rows": rows}, indent=1))
        return
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    if not names or set(names) - set(ROWS):
        parser.error(f"--rows: {args.rows!r}; choose from {', '.join(ROWS)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("iu_xray" if device == "cuda" else "tiny")
    if args.row:
        fast = args.row == "published-fast"
        run_published(preset_name, device, args.studies, args.fast_epochs if fast else args.epochs,
                      args.run_dir / args.row, fast=fast)
        return
    args.run_dir.mkdir(parents=True, exist_ok=True)
    for old in names:
        if (args.run_dir / old).exists():
            sys.exit(f"--run-dir: {args.run_dir / old} exists; remove it or choose another --run-dir")
    from r2gen.data.synth import default_dataset

    default_dataset(studies=args.studies)  # generated once, before either row's clock starts
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []

    def child(row: str) -> list[str]:
        return [sys.executable, __file__, "--row", row, "--studies", str(args.studies), "--preset", preset_name,
                "--device", device, "--run-dir", str(args.run_dir), *epochs,
                *(["--fast-epochs", str(args.fast_epochs)] if args.fast_epochs else [])]

    commands = {
        "published": (child("published"), args.budget_s),
        "published-fast": (child("published-fast"), args.fast_budget_s),
        "auto": ([sys.executable, "-c", "from launcher.cli import main; main()", "auto", "--studies",
                  str(args.studies), "--run-dir", str(args.run_dir), "--name", "auto", *epochs], args.auto_budget_s)}
    rows = []
    for name in names:
        cmd, budget = commands[name]
        began = _timed(cmd, budget, args.run_dir / f"{name}.log")
        rows.append(summarize(name, args.run_dir / name, began) | {"budget_s": budget})
    target, ratio = compare(rows)
    derived = derive(rows, args.target)
    title = f"{args.studies} studies, {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
    print_table(rows, target, ratio, title)
    if derived:
        print_derived(derived)
    if args.json:
        args.json.write_text(json.dumps({"title": title, "target_val_f1": target, "ratio": ratio, "derived": derived,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
