"""Time to a good model: the published R2Gen configuration against `r2gen-launch auto`, on the same data.

    python bench/time_to_quality.py --studies 3000 --budget-s 480 --json time_to_quality.json     # one GPU, 3 seeds
    python bench/time_to_quality.py --device cpu --studies 40 --epochs 2 --seeds 2                  # CPU smoke
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

Seeds (--seeds N, 3 by default): published-fast and auto run once per seed (the preset's seed, +1,
...), and every figure of the derived table is their mean ± standard deviation (the runs), compared
by launcher.spread's rule. The published row runs once, on the first seed: it is the clock (wall
time per epoch), not a quality figure. Timings come from runs alone on the device: auto's runs one
after another; published-fast's only count epochs, so on a GPU its seeds share the card at once
(--fast-together).
"""

from __future__ import annotations

import argparse
import json
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
from launcher.spread import Spread, seed_list, seed_run_name, shown, stored, verdict  # noqa: E402
from launcher.spawn import repo_env  # noqa: E402
from r2gen.errors import ConfigError  # noqa: E402

ROWS = ("published", "published-fast", "auto")

PUBLISHED = dict(window_size=16, micro_batch=0, num_workers=2, pin_memory=False, cache_images=False,
                 uint8_images=False, val_every=1, test_every=1, checkpoint_every_min=0.0,
                 reference_generation=True)
"""The published trainer's settings (fp32, no step speed-ups: TrainConfig.without_speedups)."""


def run_published(preset_name: str, device: str, studies: int, epochs: int | None, run_dir: Path,
                  fast: bool = False, seed: int | None = None) -> None:
    """The published configuration's run, in this process (the bench starts it as a child); `fast`: with
    the fast evaluation instead of the published beam search (the published-fast row)."""
    from backends.registry import build_backend
    from r2gen.build import prepare
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.synth import default_dataset
    from r2gen.train import train

    settings = {**PUBLISHED, **({"reference_generation": False} if fast else {})}
    cfg = preset(preset_name).replace(studies=studies, **settings, **({"epochs": epochs} if epochs else {}),
                                      **({"seed": seed} if seed is not None else {}))
    cfg = cfg.without_speedups()
    annotation = load_annotation(default_dataset(studies=studies))
    prep = prepare(cfg, build_backend("plain", device, "fp32"), annotation, None)
    train(prep, run_dir, Console(stderr=True))


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, float]:
    """Start cmd (this repository on its path, output to log); the process and its start time."""
    began = time.time()
    child = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=repo_env())
    return child, began


def _finish(child: subprocess.Popen, deadline: float | None) -> None:
    """Wait for child until the deadline (time.time()), then SIGTERM, and SIGKILL 30 s later."""
    try:
        child.wait(timeout=None if deadline is None else max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def summarize(name: str, run_dir: Path, began: float, seed: int | None = None) -> dict:
    records = read_records(run_dir / "metrics.jsonl")
    evaluated = [r for r in records if r.get("val/findings_macro_f1") is not None]
    curve = [(r["time/unix_s"] - began, r["val/findings_macro_f1"]) for r in evaluated]
    last = {}
    for r in records:
        last.update(r)
    test = "best_test" if "best_test/BLEU_4" in last else "test"
    return {"row": name, "seed": seed, "run_dir": str(run_dir), "curve": curve, "val_epochs": [r["epoch"] for r in evaluated],
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


def by_row(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each name (one per seed), in the order run."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["row"], []).append(row)
    return grouped


def mean_if_all(values: list[float | None]) -> float | None:
    """The mean where every run has a value (a run that never reached the target leaves no mean)."""
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def compare(rows: list[dict]) -> tuple[float | None, float | None]:
    """Each row's time to the published row's best val F1 (set in place); the target and the ratio of the
    published row's time over auto's mean time (None unless every auto run reached it)."""
    grouped = by_row(rows)
    target = grouped["published"][0]["best_val_f1"] if "published" in grouped else None
    for row in rows:
        row["time_to_target_s"] = time_to(row["curve"], target)
    published = mean_if_all([r["time_to_target_s"] for r in grouped.get("published", [])])
    auto = mean_if_all([r["time_to_target_s"] for r in grouped.get("auto", [])])
    return target, (published / auto if published and auto else None)


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
    """The published configuration's derived time to target, per seed: that seed's published-fast epochs
    to it times the published row's measured wall time per epoch; auto's measured time to it, per seed;
    the ratio of their means; test findings F1 and BLEU-4 of both over seeds, compared by the spread rule;
    the largest val F1 gap over the epochs the published row and the same seed's published-fast both
    evaluated (the same training, another decoder). None without both published rows."""
    grouped = by_row(rows)
    if not {"published", "published-fast"} <= set(grouped):
        return None
    published, fast, auto = grouped["published"][0], grouped["published-fast"], grouped.get("auto", [])
    epoch_s = per_epoch_s(published)
    epochs = [epochs_to(r, target) for r in fast]
    derived = [e * epoch_s if e is not None and epoch_s is not None else None for e in epochs]
    auto_times = [time_to(r["curve"], target) for r in auto]
    twin = next((r for r in fast if r.get("seed") == published.get("seed")), fast[0])
    both = dict(zip(published.get("val_epochs") or [], (f for _, f in published["curve"])))
    gaps = [abs(both[e] - f) for e, (_, f) in zip(twin.get("val_epochs") or [], twin["curve"]) if e in both]
    mean_derived, mean_auto = mean_if_all(derived), mean_if_all(auto_times)

    quality = {}
    for key in ("test_f1", "test_bleu4"):
        pub_q, auto_q = Spread.of(r[key] for r in fast), Spread.of(r[key] for r in auto)
        quality[key] = {"published": pub_q.to_dict() if pub_q else None, "auto": auto_q.to_dict() if auto_q else None,
                        "auto_vs_published": verdict(auto_q, pub_q)}
    return {"target_val_f1": target, "seeds": [r.get("seed") for r in fast], "auto_seeds": [r.get("seed") for r in auto],
            "published_s_per_epoch": epoch_s, "epochs_to_target": epochs,
            "published_time_to_target_s": stored(derived), "auto_time_to_target_s": stored(auto_times),
            "reached": {"published": sum(d is not None for d in derived), "auto": sum(a is not None for a in auto_times)},
            "ratio": mean_derived / mean_auto if mean_derived and mean_auto else None,
            "quality": quality, "baseline_bleu4": next((r["baseline_bleu4"] for r in rows if r.get("baseline_bleu4")), None),
            "cross_check_max_f1_gap": max(gaps) if gaps else None, "cross_check_epochs": len(gaps)}


def print_table(rows: list[dict], target: float | None, ratio: float | None, title: str) -> None:
    def fmt(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    baseline = next((r["baseline_bleu4"] for r in rows if r["baseline_bleu4"] is not None), None)
    table = Table(title=f"time to val findings-F1 {fmt(target)} (the published row's best within its budget), {title}",
                  caption=f"constant-report baseline: test BLEU-4 {fmt(baseline)}, findings F1 0; ratio "
                          f"published / auto time to target: {fmt(ratio, 1)}x")
    for col in ("row", "seed", "time to target s", "wall s", "epochs", "steps", "train samples/s", "best val F1",
                "test findings F1", "test BLEU-4"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(r["row"], str(r.get("seed", "")), fmt(r["time_to_target_s"], 0), fmt(r["wall_s"], 0), str(r["epochs"]), str(r["steps"]),
                      fmt(r["samples_per_s"], 1), fmt(r["best_val_f1"]), fmt(r["test_f1"]), fmt(r["test_bleu4"]))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log file gets the whole table


def print_derived(derived: dict) -> None:
    def fmt(v, d=0):
        return "n/a" if v is None else f"{v:.{d}f}"

    gap, n = derived["cross_check_max_f1_gap"], len(derived["seeds"])
    quality = derived["quality"]
    table = Table(title=f"time to val findings-F1 {derived['target_val_f1']:g}: the published schedule's own clock, "
                        f"mean ± standard deviation (runs) over seeds",
                  caption=f"ratio of mean times, published (derived) / auto: {fmt(derived['ratio'], 1)}x; reached the "
                          f"target: published {derived['reached']['published']}/{n}, auto "
                          f"{derived['reached']['auto']}/{len(derived['auto_seeds'])}; test findings F1 auto vs "
                          f"published: {quality['test_f1']['auto_vs_published']}, BLEU-4: "
                          f"{quality['test_bleu4']['auto_vs_published']} (constant report BLEU-4 "
                          f"{fmt(derived['baseline_bleu4'], 3)}, F1 0); cross-check, val F1 of the "
                          f"{derived['cross_check_epochs']} epoch(s) both published rows ran: largest gap {fmt(gap, 3)}")
    for col in ("row", "how", "s per epoch", "epochs to target", "time to target s", "test findings F1",
                "test BLEU-4"):
        table.add_column(col, justify="left" if col in ("row", "how") else "right")
    table.add_row("published", "derived: published-fast's epochs x published's measured s per epoch",
                  fmt(derived["published_s_per_epoch"], 1), ", ".join(fmt(e) for e in derived["epochs_to_target"]),
                  shown(derived["published_time_to_target_s"], 0), shown(quality["test_f1"]["published"], 3),
                  shown(quality["test_bleu4"]["published"], 3))
    table.add_row("auto", "measured from its command's start", "", "", shown(derived["auto_time_to_target_s"], 0),
                  shown(quality["test_f1"]["auto"], 3), shown(quality["test_bleu4"]["auto"], 3))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


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
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds of the published-fast and auto rows: the preset's seed, +1, ... (default 3)")
    parser.add_argument("--fast-together", action=argparse.BooleanOptionalAction, default=None,
                        help="run the published-fast seeds at once (they only count epochs; default: on a GPU)")
    parser.add_argument("--row", choices=ROWS[:2], help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # the child process
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

    from r2gen.config import preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("iu_xray" if device == "cuda" else "tiny")
    if args.row:
        fast = args.row == "published-fast"
        run_published(preset_name, device, args.studies, args.fast_epochs if fast else args.epochs,
                      args.run_dir / seed_run_name(args.row, args.seed), fast=fast, seed=args.seed)
        return
    first = preset(preset_name).seed
    try:
        seeded = seed_list(first, args.seeds)
    except ConfigError as exc:
        parser.error(str(exc))
    seeds = {"published": [first], "published-fast": seeded, "auto": seeded}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        for seed in seeds[name]:
            if (args.run_dir / seed_run_name(name, seed)).exists():
                sys.exit(f"--run-dir: {args.run_dir / seed_run_name(name, seed)} exists; remove it or choose another "
                         "--run-dir")
    from r2gen.data.synth import default_dataset

    default_dataset(studies=args.studies)  # generated once, before any row's clock starts
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []

    def command(row: str, seed: int) -> list[str]:
        if row == "auto":
            return [sys.executable, "-c", "from launcher.cli import main; main()", "auto", "--studies",
                    str(args.studies), "--run-dir", str(args.run_dir), "--name", seed_run_name("auto", seed), "--seed", str(seed),
                    *epochs]
        return [sys.executable, __file__, "--row", row, "--seed", str(seed), "--studies", str(args.studies),
                "--preset", preset_name, "--device", device, "--run-dir", str(args.run_dir), *epochs,
                *(["--fast-epochs", str(args.fast_epochs)] if args.fast_epochs else [])]

    budgets = {"published": args.budget_s, "published-fast": args.fast_budget_s, "auto": args.auto_budget_s}
    together = args.fast_together if args.fast_together is not None else device == "cuda"
    rows = []
    for name in names:
        # Timed rows run alone, one seed after another; published-fast's seeds may share the device.
        batches = [seeds[name]] if name == "published-fast" and together else [[seed] for seed in seeds[name]]
        for batch in batches:
            started = [(seed, *_start(command(name, seed), args.run_dir / f"{seed_run_name(name, seed)}.log")) for seed in batch]
            for seed, child, began in started:
                _finish(child, None if budgets[name] is None else began + budgets[name])
            rows += [summarize(name, args.run_dir / seed_run_name(name, seed), began, seed) | {"budget_s": budgets[name]}
                     for seed, _, began in started]
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
