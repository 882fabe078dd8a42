"""Where one training step's time goes: per part of the model, and the top operators.

    python bench/profile_step.py --batch-size 256 --precision bf16          # on a GPU
    python bench/profile_step.py --device cpu --preset tiny --batch-size 8  # CPU machines

A batch of real-shaped inputs already on the device (max-length reports), the loop's own step
(train_step: autocast, masked NLL, backward, value clipping, Adam), timed with device
synchronization around each of its parts run alone: the visual extractor (forward + backward),
the encoder-decoder on fixed features, its relational memory alone, and the whole step. Then
torch.profiler on one whole step: the operators that take the most device time and how many
kernels (GPU) or operator calls (CPU) one step launches. Measure here before optimizing a part.

    python bench/profile_step.py --new-shapes 65,20 [--speedups-off cudnn_benchmark]

What a new batch shape costs instead: the first step at each size in turn (on a GPU: CUDA graph
capture and cuDNN's autotuning of that shape) against its steady step, with some speed-ups off.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.plain import PlainBackend  # noqa: E402
from bench.timing import ms_per_call, sync  # noqa: E402
from launcher.probe import synthetic_batch  # noqa: E402
from r2gen.build import prepare_model  # noqa: E402
from r2gen.config import STEP_SPEEDUPS, preset  # noqa: E402
from r2gen.model.r2gen import R2GenModel, masked_nll  # noqa: E402
from r2gen.speedups import CudaGraphed  # noqa: E402
from r2gen.step import train_step  # noqa: E402

VOCAB = 60


def new_shapes(model, optimizer, backend, cfg, sizes: list[int], reps: int, off: list[str]) -> None:
    """The first training step at each size in turn, then that size's steady step."""
    device = backend.device
    table = Table(title=f"{cfg.preset} preset, {backend.precision}, speed-ups off: {', '.join(off) or 'none'}; "
                        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}")
    for column in ("micro-batch", "first step s", "steady step ms", "first - steady s"):
        table.add_column(column, justify="right")
    for size in sizes:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(cfg, VOCAB, size).items()}
        step = partial(train_step, model, optimizer, backend, batch, cfg.clip_value)
        first = ms_per_call(step, device, reps=1, warmup=0) / 1000  # seconds
        steady = ms_per_call(step, device, reps)
        table.add_row(str(size), f"{first:.2f}", f"{steady:.1f}", f"{first - steady / 1000:.2f}")
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None, help="iu_xray on a GPU, tiny on a CPU by default")
    parser.add_argument("--precision", default=None, help="bf16 on a GPU, fp32 on a CPU by default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--no-speedups", action="store_true",
                        help="without the GPU step speed-ups (channels_last, cuDNN autotuning, fused Adam, CUDA graphs)")
    parser.add_argument("--encoder-decoder-graphs", action="store_true",
                        help="CUDA graphs of the encoder-decoder alone (graph_visual_extractor off), not of the whole model")
    parser.add_argument("--speedups-off", default="", help=f"comma-separated, of {', '.join(STEP_SPEEDUPS)}")
    parser.add_argument("--trace", default="", help="write the profiled step's Chrome trace (JSON) to this file "
                        "(kernels per stream: chrome://tracing, Perfetto, or bench/trace_summary.py)")
    parser.add_argument("--new-shapes", default="", help="comma-separated micro-batches: each one's first step "
                        "against its steady step, in this order (the parts and the profiler are skipped)")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    cfg = preset(args.preset or ("iu_xray" if on_gpu else "tiny"))
    if args.no_speedups:
        cfg = cfg.without_speedups()
    off = [name for name in args.speedups_off.split(",") if name]
    if unknown := sorted(set(off) - set(STEP_SPEEDUPS)):
        parser.error(f"--speedups-off: unknown {', '.join(unknown)} (choose from {', '.join(STEP_SPEEDUPS)})")
    cfg = cfg.replace(**{name: False for name in off}, graph_visual_extractor=not args.encoder_decoder_graphs)
    backend = PlainBackend(args.device, args.precision or ("bf16" if on_gpu else "fp32"))
    device = backend.device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model, optimizer = prepare_model(backend, R2GenModel(cfg.model, VOCAB), cfg)
    if CudaGraphed.installed(model):  # the whole step is graphed; the encoder-decoder's part is timed graphed too
        CudaGraphed.install(model, "forward_features")
    model.train()
    if args.new_shapes:
        new_shapes(model, optimizer, backend, cfg, [int(b) for b in args.new_shapes.split(",")], args.reps, off)
        return
    batch = synthetic_batch(cfg, VOCAB, args.batch_size)
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    images, targets, masks = on_device["images"], on_device["targets"], on_device["masks"]
    with torch.no_grad(), backend.autocast():
        features = model.extract(images)[0].detach()
    rm = model.encoder_decoder.model.rm
    tokens = torch.randn(args.batch_size, targets.size(1) - 1, cfg.model.d_model, device=device, requires_grad=True)

    def extractor() -> None:
        with backend.autocast():
            att, fc = model.extract(images)
        (att.float().mean() + fc.float().mean()).backward()

    def encoder_decoder() -> None:
        with backend.autocast():
            logprobs = model.forward_features(features, targets)
        masked_nll(logprobs.float(), targets, masks).backward()

    def relational_memory() -> None:
        with backend.autocast():
            out = rm(tokens, rm.init_memory(args.batch_size, tokens))
        out.float().mean().backward()

    def step() -> None:
        train_step(model, optimizer, backend, on_device, cfg.clip_value)

    parts = [("visual extractor (fwd+bwd)", extractor), ("encoder-decoder on features (fwd+bwd)", encoder_decoder),
             ("  of which relational memory (fwd+bwd)", relational_memory), ("whole step (with Adam)", step)]
    times = [(name, ms_per_call(fn, device, args.reps)) for name, fn in parts]
    model.zero_grad(set_to_none=True)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.key_averages()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if on_gpu:
        kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        launched = f"{kernels:,} GPU kernels per step"
        key = "device_time_total"
    else:
        launched = f"{sum(e.count for e in events if e.key.startswith('aten::')):,} operator calls per step"
        key = "self_cpu_time_total"

    title = (f"{cfg.preset} preset, {backend.precision}, batch {args.batch_size}, "
             f"{'no speed-ups' if args.no_speedups else 'speed-ups on'}, "
             f"{torch.cuda.get_device_name(device) if on_gpu else 'CPU'}, torch {torch.__version__}: {launched}")
    table = Table(title=title)
    for column in ("part", "ms", "samples/s"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for name, ms in times:
        table.add_row(name, f"{ms:.1f}", f"{1000 * args.batch_size / ms:.0f}")
    console = Console(width=160)
    console.print(table)
    console.print(events.table(sort_by=key, row_limit=args.top))


if __name__ == "__main__":
    main()
