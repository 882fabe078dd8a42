"""Whole-model CUDA graphs (graph_visual_extractor) against the eager model, fp32 with TF32 off, for several
ways of running the relational memory inside the captured step: which of them gives the eager gradients?

Each row: the iu_xray model without speed-ups and a twin with `CudaGraphed.install(twin, "forward")`, the same
weights, dropout off, three steps with an Adam step in between (as tests/test_speedups.py's whole-model test);
the largest relative gradient error (per tensor, in norm) among the relational memory's parameters and among all
others, per step. The rule the test holds them to is 2^-16 = 1.5e-5.

Variants: `side` is r2gen.speedups.overlapped_forward (the memory on a second stream, its states
recorded on the main stream; the 2026-12-07 H100 measurement also ran it without that record, 2.8e-6 /
7.5e-6, before the record became the code's), `one-stream` the model's own forward, `side-fused` the
second stream with the fused relational memory.

    python bench/stream_check.py [--variants side,one-stream,side-fused]
"""

from __future__ import annotations

import argparse
from functools import partial

import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.plain import PlainBackend  # noqa: E402
from r2gen.build import prepare_model  # noqa: E402
from r2gen.config import preset  # noqa: E402
from r2gen.fused_memory import install_fused_memory  # noqa: E402
from r2gen.model.r2gen import R2GenModel, masked_nll  # noqa: E402
from r2gen.speedups import CudaGraphed, overlapped_forward  # noqa: E402

VOCAB = 60


def _one_stream(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return type(model).forward(model, images, targets)


VARIANTS = {"side": overlapped_forward, "one-stream": _one_stream, "side-fused": overlapped_forward}


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    images = torch.randn(6, 2, 3, 96, 96, generator=g)
    width = 31 + step
    lengths = torch.randint(3, width + 1, (6,), generator=g)
    lengths[0] = width
    masks = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    targets = torch.randint(1, VOCAB + 1, (6, width), generator=g) * masks
    targets[:, 0] = 0
    return images.cuda(), targets.cuda(), masks.cuda()


def check(variant: str) -> list[tuple[float, float]]:
    """Per step: (largest relative error among the memory's parameters, among all others)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = preset("iu_xray")
    backend = PlainBackend("cuda", "fp32")
    torch.manual_seed(0)
    model, optimizer = prepare_model(backend, R2GenModel(cfg.model, VOCAB), cfg.without_speedups())
    twin = R2GenModel(cfg.model, VOCAB).cuda().train()
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        m.train()
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if variant.endswith("fused"):
        for m in (model, twin):
            install_fused_memory(m)
    graphed = CudaGraphed.install(twin, "forward")
    graphed.captured = partial(VARIANTS[variant], twin)
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for step in range(3):
        images, targets, masks = _batch(step)
        grads = []
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            masked_nll(m(images, targets).float(), targets, masks).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        errors = {n: float((b - a).norm() / a.norm().clamp_min(1e-30)) for n, a, b in zip(names, *grads)
                  if not n.endswith("linears.1.bias")}  # zero in exact arithmetic (see the test)
        memory = max(e for n, e in errors.items() if ".rm." in n)
        rest = max(e for n, e in errors.items() if ".rm." not in n)
        rows.append((memory, rest))
        optimizer.step()
        twin.load_state_dict(model.state_dict())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    table = Table(title=f"whole-model graphs vs eager, fp32, {torch.cuda.get_device_name()}: largest relative "
                        "gradient error (memory's parameters / all others)")
    table.add_column("variant")
    for step in range(3):
        table.add_column(f"step {step}", justify="right")
    for variant in args.variants.split(","):
        rows = check(variant)
        table.add_row(variant, *(f"{m:.1e} / {r:.1e}" for m, r in rows))
        print(variant, [f"{m:.1e}/{r:.1e}" for m, r in rows], flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
