"""Training throughput: the published R2Gen configuration against the launcher's `auto` plan, one run.

    python bench/train_throughput.py --steps 60 --studies 4000 --json train_throughput.json
    python bench/train_throughput.py --device cpu --preset tiny --steps 8 --studies 200   # CPU smoke
    python bench/train_throughput.py --rows plain:fp32:16,plain:bf16:64 --steps 30 --warmup 5 --studies 400

Every row trains the same preset on the same embedded set (or --ann-path), each in its own plainly
started Python process, through the shared loop's loader and step:
- reference: the published code's configuration: fp32, batch 16, images decoded and normalized on
  the host by R2Gen's transforms (no cache, float batches), 2 workers, not pinned, no compilation;
- auto: what `r2gen-launch auto` plans on this machine (engine and precision, the probed
  micro-batch under the throughput policy, workers, pinning, the image cache, uint8 batches) with
  the step's GPU speed-ups (channels_last, cuDNN autotuning, fused Adam, the fused relational
  memory, CUDA graphs of the whole model's forward and backward);
- auto-eager: the same plan without those speed-ups (what they add);
- plain:PRECISION:BATCH: the plain backend at that precision and batch with the preset's own
  settings (loader, step speed-ups), what bench/plain_throughput.py measured (its defaults:
  --steps 30 --warmup 5 --studies 400).
Each row: samples/s, ms per optimizer step, the share of time waiting for data, peak GPU memory,
model FLOPs utilization (the model's training FLOPs per sample, counted by torch's FlopCounterMode,
times samples/s, over a large matrix product's measured rate in the row's precision) and the
ratio to the reference.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import ms_per_call, time_training  # noqa: E402

REFERENCE = dict(precision="fp32", window_size=16, num_workers=2, pin_memory=False, cache_images=False,
                 uint8_images=False)  # and none of the step speed-ups (TrainConfig.without_speedups)


def plain_row(which: str) -> tuple[str, int] | None:
    """(precision, batch size) of a plain:PRECISION:BATCH row name; None for any other name."""
    found = re.fullmatch(r"plain:([^:]+):(\d+)", which)  # a row's name, parsed (not a question to an engine)
    return (found[1], int(found[2])) if found else None


def matmul_tflops(device: torch.device, precision: str) -> float:
    """A large matrix product's rate here, in the row's precision (the MFU denominator)."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / (ms_per_call(lambda: a @ b, device, reps=10, warmup=3) / 1000) / 1e12


def train_flops_per_sample(model: torch.nn.Module, batch: dict, device: torch.device) -> float:
    """Forward + backward FLOPs of one study, counted on two studies of a real batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from r2gen.data.datasets import images_to_device
    from r2gen.model.r2gen import masked_nll
    from r2gen.speedups import eager_path

    images, targets = images_to_device(batch["images"][:2], device), batch["targets"][:2].to(device)
    with eager_path(model), FlopCounterMode(display=False) as counter:
        masked_nll(model(images, targets), targets, batch["masks"][:2].to(device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def run_row(which: str, preset_name: str, device: str, steps: int, warmup: int, studies: int,
            ann_path: Path | None) -> dict:
    """One configuration's timed training (in a fresh process)."""
    from backends.registry import build_backend
    from launcher.options import plan_options
    from launcher.auto import auto_start
    from launcher.request import DataPaths, RunRequest
    from launcher.run import prepare_run
    from launcher.plan import apply_plan
    from r2gen.build import prepare, prepare_model
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.loader import build_loader
    from r2gen.data.synth import default_dataset
    from r2gen.step import train_step

    if which not in ("auto", "auto-eager"):  # reference or plain:PRECISION:BATCH: the plain backend, not planned
        if which == "reference":
            precision = REFERENCE["precision"]
            cfg = preset(preset_name).replace(studies=studies, **{k: v for k, v in REFERENCE.items()
                                                                  if k != "precision"}).without_speedups()
            plan_summary = "fp32, batch 16, host transforms, 2 workers, not pinned"
        else:
            precision, batch_size = plain_row(which)
            cfg = preset(preset_name).replace(window_size=batch_size, studies=studies)
            plan_summary = (f"plain {precision}, batch {batch_size}, the preset's {cfg.num_workers} workers, pinned "
                            f"{cfg.pin_memory}, cache {cfg.cache_images}, uint8 {cfg.uint8_images}, step speed-ups")
        backend = build_backend("plain", device, precision)
        annotation = load_annotation(ann_path or default_dataset(studies=studies), None, cfg.model.dataset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep = prepare(cfg, backend, annotation, None)
    else:
        options = plan_options(None, True, None, None, None, None, "sqrt", None, "throughput")
        cuda = device == "cuda"
        precision = auto_start(cuda, cuda and torch.cuda.is_bf16_supported(), 0, None).precision  # auto's own rule
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep, plan, _ = prepare_run(RunRequest(None, device, precision, preset_name, options,  # None: auto
                                                   {"studies": studies}, data=DataPaths(ann_path), run_dir=None))
        from backends.spec import Topology
        from launcher.engine_config import engine_config_for

        engine_file = engine_config_for(plan, Topology(), Path("bench-run"))  # nothing written
        plan.spec.configure(prep.backend, engine_file.config if engine_file else None)
        prep.cfg = cfg = apply_plan(prep.cfg, plan)
        if which == "auto-eager":
            prep.cfg = cfg = cfg.without_speedups()
        backend = prep.backend
        plan_summary = (f"{plan.backend} {plan.precision}, micro {plan.batch.micro_batch} x accumulation "
                        f"{plan.batch.accumulation}, {cfg.num_workers} workers, pinned {cfg.pin_memory}, "
                        f"cache {cfg.cache_images}, uint8 {cfg.uint8_images}"
                        + ("" if which == "auto" else ", no step speed-ups"))
    if warmup < 0:  # with graphs or autotuning, the first epoch and two steps: every window shape is made by then
        first_epoch = -(-len(prep.annotation.splits["train"]) // (cfg.window_size * backend.world_size))
        warmup = first_epoch + 2 if cfg.cuda_graphs or cfg.cudnn_benchmark else 5
    model, optimizer = prepare_model(backend, prep.model, cfg)
    model.train()
    loader = build_loader(prep, "train", train=True)
    micro = cfg.micro_batch or cfg.window_size
    flops, losses = [], []  # FLOPs per sample (counted on the first batch, before its step); every step's loss

    def count_flops(batch: dict) -> None:
        flops.append(train_flops_per_sample(backend.unwrap(model), batch, backend.device))

    def step(batch: dict) -> None:
        losses.append(train_step(model, optimizer, backend, batch, cfg.clip_value, micro)[0])

    timing = time_training(loader, step, backend.device, warmup, steps, first_batch=count_flops)
    flops, samples_per_s = flops[0], timing.samples_per_s
    peak = matmul_tflops(backend.device, backend.precision if backend.precision != "fp8" else "bf16")
    return {"config": which, "plan": plan_summary, "preset": preset_name, "samples_per_s": samples_per_s,
            "ms_per_step": timing.ms_per_step, "data_wait_pct": timing.data_wait_pct,
            "peak_allocated_gib": timing.peak_allocated_gib,
            "train_gflops_per_sample": flops / 1e9, "matmul_tflops": peak,
            "mfu_pct": 100 * flops * samples_per_s / (peak * 1e12), "loss_first": losses[0], "loss_last": losses[-1],
            "device": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else "CPU",
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="iu_xray on a GPU, tiny on a CPU by default")
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=-1,
                        help="steps before the clock starts; -1 (default): 5, or, for a row with the step speed-ups, the first "
                             "epoch and two more, so that the epoch's shorter last window has been captured as CUDA "
                             "graphs and autotuned once")
    parser.add_argument("--studies", type=int, default=4000,
                        help="size of the embedded set (its train split must hold auto's window)")
    parser.add_argument("--ann-path", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rows", default="reference,auto-eager,auto",
                        help="rows, the first is the ratio's base: reference, auto-eager (auto's plan without the "
                             "step speed-ups: channels_last, cuDNN autotuning, fused Adam, CUDA graphs), auto, "
                             "plain:PRECISION:BATCH (the plain backend with the preset's settings, e.g. plain:bf16:64)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # in the child process: run this row, print it
    args = parser.parse_args()
    args.preset = args.preset or ("iu_xray" if args.device == "cuda" else "tiny")
    if unknown := [r for r in args.rows.split(",") if r not in ("reference", "auto-eager", "auto") and not plain_row(r)]:
        parser.error(f"--rows: unknown {', '.join(unknown)}")
    if args.one:
        print(json.dumps(run_row(args.one, args.preset, args.device, args.steps, args.warmup, args.studies,
                                 args.ann_path)))
        return
    rows = []
    for which in args.rows.split(","):
        began = time.perf_counter()
        command = [sys.executable, __file__, "--one", which, "--device", args.device, "--preset", args.preset,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--studies", str(args.studies)]
        if args.ann_path:
            command += ["--ann-path", str(args.ann_path)]
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr passes through
        lines = child.stdout.strip().splitlines()
        row = json.loads(lines[-1]) if child.returncode == 0 and lines else \
            {"config": which, "failed": f"exit code {child.returncode}"}
        row["wall_s"] = time.perf_counter() - began
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    base = rows[0].get("samples_per_s")
    device = next((r["device"] for r in rows if "device" in r), args.device)
    table = Table(title=f"training throughput: {args.preset} preset on {device}, torch {torch.__version__}, "
                        f"{args.steps} timed steps per row")
    for column in ("config", "plan", "samples/s", "ms/step", "data wait %", "peak GiB", "GFLOP/sample", "MFU %",
                   "vs reference"):
        table.add_column(column, justify="left" if column in ("config", "plan") else "right", overflow="fold")
    for r in rows:
        if "failed" in r:
            table.add_row(r["config"], f"failed: {r['failed']}", *[""] * 7)
            continue
        peak = f"{r['peak_allocated_gib']:.2f}" if r["peak_allocated_gib"] is not None else "-"
        table.add_row(r["config"], r["plan"], f"{r['samples_per_s']:.1f}", f"{r['ms_per_step']:.0f}",
                      f"{r['data_wait_pct']:.1f}", peak, f"{r['train_gflops_per_sample']:.1f}",
                      f"{r['mfu_pct']:.1f}", f"{r['samples_per_s'] / base:.2f}x" if base else "-")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
