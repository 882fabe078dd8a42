"""`--seeds N` on a training command: the same command once per seed, one after another, each in its
own process and run folder (`<name>-s<seed>`), then every test score over the seeds (mean ± standard
deviation, the runs) beside the constant-report baseline, written to `<run-dir>/<name>-seeds.json`.

One run says little about R2Gen: its scores move with the seed about as much as the effects people
look for. Runs are never concurrent here (their timings stay their own); a seed whose run already
finished (its folder holds a test score) is kept when the same command is given again, and one that
was interrupted continues with --keep-training.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

from launcher.run_report import read_records
from launcher.spawn import repo_env
from launcher.spread import seed_run_name, stored
from r2gen.errors import ConfigError
from r2gen.findings import FINDINGS_KEYS
from r2gen.scores import SCORE_KEYS

DROPPED = ("--seeds", "--seed", "--name", "--keep-training")
"""Flags run_seeds sets itself in each seed's command line."""
EXCLUSIVE = ("--dry-run",)


def seed_argv(argv: list[str], seed: int, name: str, resume: bool) -> list[str]:
    """The command line of one seed's run: argv without DROPPED (and their values), then --seed and --name
    (and --keep-training where that seed's run is continued)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag in DROPPED:
            skip = "=" not in token and flag != "--keep-training"
            continue
        out.append(token)
    return [*out, "--seed", str(seed), "--name", name, *(["--keep-training"] if resume else [])]


def seed_names(name: str | None, seeds: list[int]) -> tuple[str, list[str]]:
    """The base name (--name, else one from the date) and each seed's run name."""
    base = name or f"seeds-{datetime.now():%Y%m%d-%H%M%S}"
    return base, [seed_run_name(base, seed) for seed in seeds]


def finished(run_dir: Path) -> bool:
    """Whether a run folder holds its final test scores (the loop writes them last)."""
    records = read_records(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    return any("test/BLEU_4" in r for r in records)


def scores_over_seeds(run_dirs: list[Path]) -> dict[str, dict | None]:
    """Each test score (and its constant-report baseline) over the runs: Spread.to_dict(), None if never logged."""
    lasts = []
    for folder in run_dirs:
        last: dict = {}
        for record in read_records(folder / "metrics.jsonl"):
            last.update(record)
        lasts.append(last)
    out = {}
    for key in (*SCORE_KEYS, *FINDINGS_KEYS[:2]):
        for group in ("test", "baseline_test"):
            out[f"{group}/{key}"] = stored(last.get(f"{group}/{key}") for last in lasts)
    return out


def run_seeds(argv: list[str], seeds: list[int], run_dir: Path, name: str | None, say) -> tuple[int, dict]:
    """Run the command once per seed (in order; the first failure stops it, its exit code returned) and
    write the scores over seeds; returns (exit code, summary)."""
    from r2gen.atomic import write_json

    if bad := [flag for flag in EXCLUSIVE if any(t.split("=", 1)[0] == flag for t in argv)]:
        raise ConfigError(f"--seeds: not with {bad[0]} (one plan per run; give it without --seeds)")
    base, names = seed_names(name, seeds)
    folders = [run_dir / n for n in names]
    env = repo_env()
    for seed, run_name, folder in zip(seeds, names, folders):
        if finished(folder):
            say(f"seeds: {run_name} finished before; kept")
            continue
        resume = (folder / "checkpoints" / "manifest.json").is_file()
        command = [sys.executable, "-m", "launcher.cli", *seed_argv(argv, seed, run_name, resume)]
        say(f"seeds: {run_name} {'continues' if resume else 'starts'} (seed {seed})")
        code = subprocess.run(command, env=env).returncode
        if code != 0:
            return code, {}
    summary = {"command": argv, "seeds": seeds, "runs": [str(f) for f in folders], "scores": scores_over_seeds(folders)}
    write_json(run_dir / f"{base}-seeds.json", summary)
    return 0, summary
