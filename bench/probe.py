"""The memory probe against the exhaustive answer and accelerate's find_executable_batch_size.

    python bench/probe.py --preset iu_xray --precision bf16                 # one H100: 85% of 80 GB
    python bench/probe.py --preset iu_xray --precision fp32 --max-vram 8    # an 8 GB laptop card

All three methods run real training steps (forward, backward, optimizer step) on reports of
maximum length, under the same memory budget (allocator capped at the budget, as the probe does):

- probe: the launcher's probe as the CLI runs it (a spawned process: fit through 1/4/8/16, predict,
  confirm, bisect on failure); its wall time includes the process start.
- exhaustive: doubling from 1 until a step fails, then bisection to the exact largest size that fits.
- accelerate: `find_executable_batch_size` from --accelerate-start, x0.9 after every out-of-memory.

Prints micro-batch, its share of the exhaustive answer, real steps and seconds per method, then
trains --train-steps steps at the probe's micro-batch under the cap and reports any out-of-memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import sync  # noqa: E402
from launcher.hardware import detect  # noqa: E402
from launcher.plan import PlanOptions, gpu_budget  # noqa: E402
from launcher.probe import ProbeRequest, ProbeSession, probe_in_subprocess, synthetic_batch  # noqa: E402
from launcher.thresholds import Thresholds  # noqa: E402
from r2gen.config import preset  # noqa: E402
from r2gen.step import OomRecovery  # noqa: E402


def exhaustive(session: ProbeSession, cap: int) -> tuple[int, int]:
    """Largest micro-batch whose real step fits: doubling, then bisection. Returns (size, steps)."""
    steps, good, bad = 0, 0, None
    size = 1
    while size <= cap:
        steps += 1
        if not session.step(size).fits:
            bad = size
            break
        good, size = size, size * 2
    bad = bad or cap + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        steps += 1
        if session.step(mid).fits:
            good = mid
        else:
            bad = mid
    return good, steps


def accelerate_search(session: ProbeSession, start: int) -> tuple[int, int]:
    from accelerate.utils import find_executable_batch_size

    steps = 0

    @find_executable_batch_size(starting_batch_size=start)
    def one_step(batch_size: int) -> int:
        nonlocal steps
        steps += 1
        if not session.step(batch_size).fits:
            raise RuntimeError("CUDA out of memory.")  # the message accelerate recognizes
        return batch_size

    return one_step(), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="iu_xray")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--target-util", type=float, default=85.0, help="%% of the GPU's memory")
    parser.add_argument("--max-vram", type=float, default=None, help="GiB cap, as the CLI's --max-vram")
    parser.add_argument("--vocab", type=int, default=760, help="vocabulary size (IU X-Ray: 760)")
    parser.add_argument("--max-micro", type=int, default=4096, help="largest size any method may try")
    parser.add_argument("--accelerate-start", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/probe.py needs a CUDA GPU")

    console = Console()
    cfg = preset(args.preset)
    facts = detect()
    options = PlanOptions(target_util_pct=args.target_util, max_vram_gib=args.max_vram)
    budget, why = gpu_budget(facts, options, Thresholds())
    request = ProbeRequest(cfg, args.vocab, args.precision, budget, args.max_micro,
                           others_gib=facts.gpus[0].used_by_others_gib)
    rows = []

    start = time.perf_counter()
    probe = probe_in_subprocess(request)
    rows.append({"method": "probe (launcher)", "micro_batch": probe.micro_batch, "steps": len(probe.tried),
                 "seconds": time.perf_counter() - start, "peak_gib": probe.peak_gib})

    with ProbeSession(request) as session:
        start = time.perf_counter()
        session.step(1)  # the same warm-up every method gets
        truth, steps = exhaustive(session, args.max_micro)
        rows.append({"method": "exhaustive (doubling + bisection)", "micro_batch": truth, "steps": steps + 1,
                     "seconds": time.perf_counter() - start, "peak_gib": None})
    with ProbeSession(request) as session:
        start = time.perf_counter()
        session.step(1)
        found, steps = accelerate_search(session, args.accelerate_start)
        rows.append({"method": f"accelerate find_executable_batch_size (from {args.accelerate_start})",
                     "micro_batch": found, "steps": steps + 1, "seconds": time.perf_counter() - start,
                     "peak_gib": None})

    # Train at the probe's answer under the same cap: the real loop step with its OOM guard.
    with ProbeSession(request) as session:
        guard = OomRecovery(probe.micro_batch, retries=0, wait_s=0)
        batch = synthetic_batch(cfg, args.vocab, probe.micro_batch)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()  # no warm-up: the out-of-memory check covers the first step at this size
        for _ in range(args.train_steps):
            guard.step(session.model, session.optimizer, session.backend, batch, cfg.clip_value)
        sync(session.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_reserved() / 2**30 + session.overhead_gib

    table = Table(title=f"memory probe: {facts.gpus[0].name}, {args.preset}, {args.precision}, "
                        f"budget {budget:.1f} GiB ({why}), torch {torch.__version__}")
    for column in ("method", "micro-batch", "% of exhaustive", "real steps", "seconds"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for row in rows:
        row["pct_of_exhaustive"] = 100.0 * row["micro_batch"] / max(truth, 1)
        table.add_row(row["method"], str(row["micro_batch"]), f"{row['pct_of_exhaustive']:.1f}",
                      str(row["steps"]), f"{row['seconds']:.1f}")
    console.print(table)
    training = {"micro_batch": probe.micro_batch, "steps": args.train_steps, "oom_recoveries": guard.recoveries,
                "peak_gib": peak, "budget_gib": budget, "samples_per_s": args.train_steps * probe.micro_batch / seconds}
    console.print(f"training at the probe's micro-batch {probe.micro_batch}: {args.train_steps} steps, "
                  f"{guard.recoveries} out-of-memory recoveries, peak {peak:.2f} GiB of {budget:.1f} GiB, "
                  f"{training['samples_per_s']:.1f} samples/s (model step only, batch on the GPU)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "probe": probe.to_dict(), "training": training,
                                         "gpu": facts.gpus[0].name, "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
