"""What ResNet-101's BatchNorm layers cost in one training step, per layout and dtype.

    python bench/batchnorm.py --batch-size 64            # on a GPU: both views' BatchNorms, fwd+bwd
    python bench/batchnorm.py --device cpu --batch-size 2 --image-size 64 --reps 1

The batch-64 trace of the whole-model graphs (docs/measurements.md) puts BatchNorm's channels-last
kernels at ~21 of 83 ms: PyTorch picks cuDNN's BatchNorm only for fp32/fp16 inputs (its own
channels-last kernels for bf16). Every BatchNorm2d of R2Gen's visual extractor (torchvision's
ResNet-101, training mode: batch statistics) is run alone on its real input shape, forward and
backward, in each variant: bf16 channels-last (today's step under autocast), bf16 NCHW, fp16 and
fp32 channels-last and NCHW (fp32 running statistics and affine weights in all). The sum over the
layers is one view's BatchNorm time; the step runs it for two views. Nothing here changes training:
it says which variant a change to the step should aim for, before any is built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import ms_per_call  # noqa: E402

VARIANTS = [("bf16", torch.channels_last), ("bf16", torch.contiguous_format), ("fp16", torch.channels_last),
            ("fp16", torch.contiguous_format), ("fp32", torch.channels_last), ("fp32", torch.contiguous_format)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def batchnorm_inputs(batch: int, image_size: int) -> list[tuple[int, ...]]:
    """The input shape of every BatchNorm2d in ResNet-101's forward (one view), in order."""
    import torchvision

    net = torchvision.models.resnet101().eval()  # shapes only: no batch statistics needed
    shapes: list[tuple[int, ...]] = []
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    return [(batch, *shape[1:]) for shape in shapes]


def time_variant(shapes: list[tuple[int, ...]], dtype: torch.dtype, layout, device: torch.device,
                 reps: int) -> float:
    """ms for forward + backward of every layer once (one view), training-mode BatchNorm."""
    layers = []
    for shape in shapes:
        bn = torch.nn.BatchNorm2d(shape[1]).to(device).train()
        x = torch.randn(shape, device=device).to(dtype=dtype, memory_format=layout).requires_grad_()
        grad = torch.randn(shape, device=device).to(dtype=dtype, memory_format=layout)
        layers.append((bn, x, grad))

    def step() -> None:
        for bn, x, grad in layers:
            bn(x).backward(grad)

    return ms_per_call(step, device, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="studies per step (one view)")
    parser.add_argument("--image-size", type=int, default=224, help="px (R2Gen's crop)")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = batchnorm_inputs(args.batch_size, args.image_size)
    elements = sum(torch.Size(s).numel() for s in shapes)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"{len(shapes)} BatchNorm2d layers of ResNet-101 (one view), batch {args.batch_size}, "
                        f"{args.image_size} px, forward + backward; {name}, torch {torch.__version__}")
    for column in ("input", "layout", "ms (one view)", "GB/s (x, y, dy, dx once)"):
        table.add_column(column, justify="left" if column in ("input", "layout") else "right")
    for dtype_name, layout in VARIANTS:
        if device.type == "cpu" and dtype_name == "fp16":
            continue  # CPU BatchNorm has no fp16 kernels worth timing
        ms = time_variant(shapes, DTYPES[dtype_name], layout, device, args.reps)
        moved = 4 * elements * torch.finfo(DTYPES[dtype_name]).bits / 8
        table.add_row(dtype_name, "channels-last" if layout is torch.channels_last else "NCHW", f"{ms:.2f}",
                      f"{moved / ms / 1e6:.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
