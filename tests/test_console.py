"""Output a log file can hold: under nohup or a batch scheduler (not a terminal) a training command
prints one plain line per epoch, and no progress bar that would appear only at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from r2gen.run_log import epoch_line
from child_env import repo_pythonpath

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_line_says_where_the_run_is_and_when_it_ends() -> None:
    line = epoch_line(3, 10, 120, 1.23456, 45.67, 2.4, 61.0, {"BLEU_4": 0.1234, "CIDEr": None})
    assert line == ("epoch 3/10 | step 120 | loss 1.2346 | 45.7 samples/s | data wait 2% | 61.0 s | "
                    "val BLEU_4 0.1234 | ETA 0:07:07")
    assert epoch_line(10, 10, 400, 0.5, 1.0, 0.0, 5.0).endswith("| 5.0 s | ETA 0:00:00")


def test_a_run_into_a_log_file_prints_one_plain_line_per_epoch(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath(), "R2GEN_LAUNCH_CACHE": str(tmp_path / "cache")}
    log = tmp_path / "train.log"
    with log.open("w") as f:  # a file, as `nohup ... > train.log 2>&1` gives
        done = subprocess.run([sys.executable, "-m", "launcher.cli", "plain", "--preset", "tiny", "--device", "cpu",
                               "--studies", "20", "--epochs", "2", "--effective-batch", "4", "--max-steps-per-epoch", "2", "--beam-size", "1",
                               "--val-every", "1", "--num-workers", "0", "--run-dir", str(tmp_path / "runs")],
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, text
    pattern = (r"epoch {e}/2 \| step {s} \| loss \d+\.\d{{4}} \| \d+\.\d samples/s \| data wait \d+% \| \d+\.\d s \| "
               r"val BLEU_4 \d\.\d{{4}} CIDEr \d+\.\d{{4}} findings F1 \d\.\d{{4}} \| ETA \d:\d\d:\d\d")
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(pattern.format(e=epoch, s=2 * epoch), line), line
    # No progress bar drawn into the file (rich's "train ━━━━ 4/4" line, or its carriage returns).
    assert not re.search(r"^\s*train\s+━", text, re.M) and "\r" not in text
