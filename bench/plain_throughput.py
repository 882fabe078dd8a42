"""Training throughput and peak memory of the plain backend, through the real data loader.

    python bench/plain_throughput.py --preset iu_xray --device cuda --precision fp32,bf16 --batch-sizes 16,64

For each (precision, batch size): a few warm-up steps, then timed optimizer steps on the embedded
synthetic set (or --ann-path), with images, targets and masks moved to the device as the loop does.
Prints one table row each: samples/s, ms/step, the share of time spent waiting for data, and the
peak GPU memory allocated. --json writes the rows for later comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.plain import PlainBackend  # noqa: E402
from r2gen.config import preset  # noqa: E402
from r2gen.data.datasets import load_annotation  # noqa: E402
from r2gen.data.synth import default_dataset  # noqa: E402
from r2gen.train import _loader, prepare, prepare_model, train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset_name: str, device: str, precision: str, batch_size: int, steps: int, warmup: int,
            num_workers: int, ann_path: Path | None, studies: int) -> dict:
    cfg = preset(preset_name).replace(batch_size=batch_size, num_workers=num_workers, studies=studies)
    backend = PlainBackend(device, precision)
    annotation = load_annotation(ann_path or default_dataset(studies=studies), None, cfg.model.dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(cfg, backend, annotation, None)
    model, optimizer = prepare_model(backend, prep.model, cfg)
    loader = _loader(prep, "train", train=True)
    model.train()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(backend.device)
    done, samples, wait, start = 0, 0, 0.0, 0.0
    while done < warmup + steps:
        fetched = time.perf_counter()
        for batch in loader:
            if done == warmup:
                _sync(backend.device)
                start, samples, wait = time.perf_counter(), 0, 0.0
                fetched = start
            wait += time.perf_counter() - fetched
            train_step(model, optimizer, backend, batch, cfg.clip_value)  # the loop's own step
            samples += len(batch["ids"]) if done >= warmup else 0
            done += 1
            if done >= warmup + steps:
                break
            fetched = time.perf_counter()
    _sync(backend.device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(backend.device) / 2**30 if backend.device.type == "cuda" else None
    return {"preset": preset_name, "backbone": cfg.model.backbone, "device": device, "precision": precision,
            "batch_size": batch_size, "steps": steps, "samples_per_s": samples / elapsed,
            "ms_per_step": 1000 * elapsed / steps, "data_wait_pct": 100 * wait / elapsed,
            "peak_allocated_gib": peak,
            "gpu": torch.cuda.get_device_name() if backend.device.type == "cuda" else None,
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="iu_xray")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument("--batch-sizes", default="16", help="comma-separated studies per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--studies", type=int, default=400, help="size of the embedded set")
    parser.add_argument("--ann-path", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    for precision in args.precision.split(","):
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            rows.append(measure(args.preset, args.device, precision, batch_size, args.steps, args.warmup,
                                args.num_workers, args.ann_path, args.studies))
    table = Table(title=f"plain backend, {args.preset} preset, {rows[0]['gpu'] or 'CPU'}, torch {torch.__version__}")
    for col in ("precision", "batch", "samples/s", "ms/step", "data wait %", "peak alloc GiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["precision"], str(r["batch_size"]), f"{r['samples_per_s']:.1f}", f"{r['ms_per_step']:.0f}",
                      f"{r['data_wait_pct']:.0f}", "-" if r["peak_allocated_gib"] is None else f"{r['peak_allocated_gib']:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
