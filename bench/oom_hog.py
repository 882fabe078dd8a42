"""A memory hog started in the middle of training: the run must recover and finish every sample.

    python bench/oom_hog.py --after-step 3 --hog-gib 60 -- --preset iu_xray --precision bf16 \
        --effective-batch 256 --studies 1200 --epochs 3 --val-every 1 --beam-size 1

Starts `r2gen-launch plain <args after -->` as a child process; once metrics.jsonl shows optimizer
step --after-step, starts a second process that takes free GPU memory, and keeps taking what is
released, until it holds --hog-gib (the run gives cached blocks back after each evaluation). Prints the run's out-of-memory events, samples per epoch against the train split,
and its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOG = r"""
import sys, time, torch
chunk = 256 * 2**20
target = float(sys.argv[1]) * 2**30
held = []
print(f"hog: taking {target / 2**30:.1f} GiB", flush=True)
while True:
    if len(held) * chunk < target:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
            continue
        except torch.OutOfMemoryError:
            pass
    time.sleep(0.02)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after-step", type=int, default=3)
    parser.add_argument("--hog-gib", type=float, default=60.0, help="GiB the hog takes in total, as it frees up")
    parser.add_argument("run_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]
    run_dir = Path(tempfile.mkdtemp(prefix="oom-hog-"))
    command = [sys.executable, "-c", "from launcher.cli import main; main()", "plain", *run_args,
               "--log-every", "1", "--run-dir", str(run_dir), "--name", "run"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    print("run:", " ".join(command[3:]), flush=True)
    run = subprocess.Popen(command, env=env)
    metrics = run_dir / "run" / "metrics.jsonl"
    hog = None
    try:
        while run.poll() is None and hog is None:
            if metrics.is_file():
                steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line]
                if steps and max(steps) >= args.after_step:
                    hog = subprocess.Popen([sys.executable, "-c", HOG, str(args.hog_gib)])
                    print(f"hog started after step {max(steps)}", flush=True)
            time.sleep(0.2)
        code = run.wait()
    finally:
        if hog is not None:
            hog.kill()
        if run.poll() is None:
            run.kill()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    events = [r for r in records if "oom/micro_batch_to" in r]
    epochs = [r for r in records if "train/samples" in r]
    plan = json.loads((run_dir / "run" / "plan.json").read_text())
    config = json.loads((run_dir / "run" / "config.json").read_text())
    print(f"\nplan: micro-batch {plan['batch']['micro_batch']} x accumulation {plan['batch']['accumulation']}")
    print(f"out-of-memory recoveries: {len(events)}: "
          + ", ".join(f"step {e['step']}: {e['oom/micro_batch_from']} -> {e['oom/micro_batch_to']}" for e in events))
    print("samples per epoch:", [r["train/samples"] for r in epochs], "| micro-batch per epoch:",
          [r["train/micro_batch"] for r in epochs])
    print(f"effective batch kept: {config['train']['window_size']} studies per optimizer step; exit code {code}")
    sys.exit(code)


if __name__ == "__main__":
    main()
