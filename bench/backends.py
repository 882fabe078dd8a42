"""Every backend trains the same model on the same data: samples/s, peak memory and the loss curve.

    python bench/backends.py --steps 200 --json backends.json

Each engine (default: plain bf16, accelerate fp16 and bf16, deepspeed ZeRO-2 with CPU offload in
bf16, fp8) runs in its own Python process (started as a user's run is: a multiprocessing "spawn"
child starts its 6 loader workers as spawned processes too, ~70 s on the H100) (no engine state or memory carries over): the iu_xray
preset (ResNet-101 R2Gen) on the embedded set, R2Gen's batch of 16, the real data loader, the
shared loop's step, `--steps` optimizer steps (epochs repeat as needed). Speed is timed after
`--warmup` steps; loss is reported as the mean of the first and of the last 10 steps, with a check
that every loss is finite and that it fell. Engines this machine cannot run are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import time_training  # noqa: E402

DEFAULT_ENGINES = "plain:bf16,accelerate:fp16,accelerate:bf16,deepspeed:bf16,fp8:fp8"


def run_engine(backend_name: str, precision: str, steps: int, warmup: int, batch_size: int, num_workers: int,
               studies: int) -> dict:
    """One engine's run (in a fresh process)."""
    from backends.registry import spec
    from backends.spec import ConfigInputs
    from r2gen.build import prepare, prepare_model
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.loader import build_loader
    from r2gen.data.synth import default_dataset
    from r2gen.errors import UsageError
    from r2gen.step import train_step

    began = time.perf_counter()
    setup: dict[str, float] = {}  # seconds per start-up phase

    def phase(name: str) -> None:
        setup[name] = round(time.perf_counter() - began - sum(setup.values()), 2)

    row = {"engine": backend_name, "precision": precision, "steps": steps, "batch_size": batch_size,
           "setup_s": setup}
    cfg = preset("iu_xray").replace(window_size=batch_size, num_workers=num_workers, pin_memory=True,
                                    studies=studies, cache_images=True)
    try:
        engine = spec(backend_name)
        backend = engine.build("cuda", precision)  # the engine's default options (deepspeed: ZeRO-2, CPU offload)
    except (UsageError, ImportError) as exc:
        return {**row, "skipped": str(exc)}
    engine.configure(backend, engine.generate_config(ConfigInputs("cuda", precision, engine.engine_options(),
                                                                  micro_batch=batch_size, pin_memory=True)))
    phase("imports_and_backend")
    annotation = load_annotation(default_dataset(studies=studies), None, cfg.model.dataset)
    phase("data_set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(cfg, backend, annotation, None)
    phase("model")
    model, optimizer = prepare_model(backend, prep.model, cfg)
    model.train()
    phase("engine_prepare")
    loader = build_loader(prep, "train", train=True)
    phase("loader_and_image_cache")
    losses, stepped = [], []

    def step(batch: dict) -> None:
        loss, applied = train_step(model, optimizer, backend, batch, cfg.clip_value)
        if not losses:
            phase("first_step")
        losses.append(loss)
        stepped.append(applied)

    timing = time_training(loader, step, backend.device, warmup, steps - warmup)  # --steps counts the warm-up
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    return {**row, "describe": backend.describe(), "samples_per_s": timing.samples_per_s,
            "ms_per_step": timing.ms_per_step, "data_wait_pct": timing.data_wait_pct,
            "peak_allocated_gib": timing.peak_allocated_gib,
            "loss_first10": first, "loss_last10": last, "finite": all(math.isfinite(x) for x in losses),
            "falling": last < first, "skipped_steps": stepped.count(False), "losses": losses,
            "gpu": torch.cuda.get_device_name(backend.device), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help="comma-separated backend:precision pairs")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per engine")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the clock starts")
    parser.add_argument("--batch-size", type=int, default=16, help="studies per step (R2Gen's 16)")
    parser.add_argument("--num-workers", type=int, default=6)
    parser.add_argument("--studies", type=int, default=400, help="size of the embedded set")
    parser.add_argument("--json", type=Path, help="also write the rows (with every step's loss) here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # in the child process: run this engine, print its row
    args = parser.parse_args()
    if args.one:
        name, _, precision = args.one.partition(":")
        row = run_engine(name, precision, args.steps, args.warmup, args.batch_size, args.num_workers, args.studies)
        print(json.dumps(row))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/backends.py: needs a CUDA GPU")
    if args.steps <= args.warmup + 10:
        sys.exit("--steps: must exceed --warmup + 10")

    rows = []
    for spec in args.engines.split(","):
        name, _, precision = spec.partition(":")
        began = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--warmup",
                                str(args.warmup), "--batch-size", str(args.batch_size), "--num-workers",
                                str(args.num_workers), "--studies", str(args.studies)],
                               stdout=subprocess.PIPE, text=True)  # its stderr (warnings, errors) passes through
        lines = child.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if child.returncode == 0 and lines else \
            {"engine": name, "precision": precision, "skipped": f"failed with exit code {child.returncode}"}
        row["wall_s"] = time.perf_counter() - began
        rows.append(row)
        # A line per engine as it finishes (the table comes at the end), and the JSON so far.
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    gpu = next((r["gpu"] for r in rows if "gpu" in r), torch.cuda.get_device_name())
    table = Table(title=f"backends: iu_xray preset (ResNet-101), batch {args.batch_size}, {args.steps} steps, "
                        f"{gpu}, torch {torch.__version__}")
    for col in ("engine", "precision", "samples/s", "ms/step", "data wait %", "peak alloc GiB",
                "loss first 10 -> last 10", "finite, falling", "skipped steps"):
        table.add_column(col, justify="right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["engine"], r["precision"], f"skipped: {r['skipped']}", *[""] * 6)
            continue
        table.add_row(r["engine"], r["precision"], f"{r['samples_per_s']:.1f}", f"{r['ms_per_step']:.0f}",
                      f"{r['data_wait_pct']:.0f}", f"{r['peak_allocated_gib']:.2f}",
                      f"{r['loss_first10']:.3f} -> {r['loss_last10']:.3f}",
                      f"{'yes' if r['finite'] else 'NO'}, {'yes' if r['falling'] else 'NO'}", str(r["skipped_steps"]))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
