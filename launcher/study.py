"""The precision study: training runs per precision and seed (each with its own probed batch), the
numbers side by side in study/summary.json, and a self-contained study/report.html.

Each run is the ordinary training command in its own process (`r2gen-launch <engine> --precision P
--seed S --run-dir <study>/runs --name P-sS`), so memory, probe and engine state never carry over.
Every figure of a precision is over its seeds (launcher.spread: mean, standard deviation, the runs),
and the recommendation compares quality by the seeds' spread, not by a fixed margin. The study is
resumable: summary.json is rewritten after every run; run again, finished runs are kept, an
interrupted one continues with --keep-training, the rest start.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from launcher.run_report import read_records
from launcher.spread import SPREAD_RULE, Spread, seed_run_name, stored, verdict, within_spread
from r2gen.errors import ConfigError, RunFailed
from r2gen.findings import FINDINGS_KEYS
from r2gen.scores import SCORE_KEYS

STUDY_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
STUDY_BACKENDS = ("plain", "accelerate", "deepspeed")
SAMPLES = 5
TARGET_F1 = 0.9
RULE = ("the fastest finished precision (mean train samples/s over its seeds) whose test findings macro-F1 (BLEU-4 "
        "where the data has no findings labels) is within the spread of the best precision's, "
        f"{SPREAD_RULE}; with one seed no spread is measured and only the best qualifies; on a tie, the wider "
        "format (fp32, then bf16, fp16, fp8)")
WIDTH_ORDER = ("fp32", "bf16", "fp16", "fp8")
SPREAD_KEYS = ("findings_macro_f1", "BLEU_4", "samples_per_s", "peak_vram_gib", "time_to_target_s")
"""The figures summary.json keeps over seeds per precision (its "spread")."""


def parse_precisions(text: str) -> list[str]:
    asked = [p.strip() for p in text.split(",") if p.strip()]
    if not asked:
        raise ConfigError("--precisions: name at least one of " + ", ".join(STUDY_PRECISIONS))
    for p in asked:
        if p not in STUDY_PRECISIONS:
            raise ConfigError(f"--precisions: unknown {p!r}; choose from {', '.join(STUDY_PRECISIONS)}")
    if len(set(asked)) != len(asked):
        raise ConfigError(f"--precisions: {text!r} names a precision twice")
    return asked


@dataclass
class StudyRequest:
    precisions: list[str]
    backend: str
    folder: Path
    device: str
    preset: str
    run_args: list[str] = field(default_factory=list)  # passed to every run: --epochs, --studies, ...
    seeds: list[int] = field(default_factory=lambda: [None])  # None: the preset's own seed, one run
    target_f1: float = TARGET_F1  # val findings macro-F1 whose first crossing times a run

    def __post_init__(self) -> None:
        if self.backend not in STUDY_BACKENDS:
            raise ConfigError(f"--backend: unknown {self.backend!r}; choose from {', '.join(STUDY_BACKENDS)}")


def engine_for(backend: str, precision: str) -> str:
    """FP8 is its own engine; the other precisions run on the study's backend."""
    return "fp8" if precision == "fp8" else backend


def skip_reason(backend: str, precision: str, verdicts: dict[str, dict[str, str]]) -> str | None:
    """Why this machine cannot run the precision (from `r2gen-launch env`'s table), or None."""
    engine = engine_for(backend, precision)
    verdict = verdicts.get(engine, {}).get(precision, f"{engine} has no {precision} mode")
    label = precision if engine == precision else f"{engine} {precision}"
    return None if verdict.startswith("yes") else f"{label}: {verdict}"


def run_command(request: StudyRequest, precision: str, seed: int | None, resume: bool) -> list[str]:
    engine = engine_for(request.backend, precision)
    command = [sys.executable, "-m", "launcher.cli", engine, "--run-dir", str(request.folder / "runs"),
               "--name", seed_run_name(precision, seed)]
    if resume:
        return [*command, "--keep-training"]
    if engine == request.backend:  # the study's backend takes --precision; FP8 is its own engine's only one
        command += ["--precision", precision]
    return [*command, "--device", request.device, "--preset", request.preset,
            *(["--seed", str(seed)] if seed is not None else []), *request.run_args]


def _last(records: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _present(name: str, scores: dict) -> dict:
    """{name: scores} when any score was logged, else {} (the key absent, not zeros)."""
    return {name: scores} if any(v is not None for v in scores.values()) else {}


def collect(run_dir: Path, started: float | None = None, target_f1: float = TARGET_F1) -> dict:
    """A finished run's numbers, from its metrics.jsonl, plan.json and last test reports; `started` (unix s):
    when its command started, for its time to the val findings-F1 target (None where never reached)."""
    records = read_records(run_dir / "metrics.jsonl")
    utils = [r["gpu/util_pct"] for r in records if r.get("gpu/util_pct") is not None]
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    tests = sorted((run_dir / "reports").glob("test_epoch*.json"))
    reached = next((r["time/unix_s"] for r in records if (r.get("val/findings_macro_f1") or 0.0) >= target_f1
                    and r.get("time/unix_s") is not None), None)
    return {
        "run_dir": str(run_dir), "micro_batch": plan["batch"]["micro_batch"],
        "engine": config.get("backend"),  # what ran: FP8 names its implementation and its converted layers
        "samples_per_s": _last(records, "perf/train_samples_per_s"),
        "peak_vram_gib": _last(records, "memory/peak_allocated_gib"),
        "gpu_util_pct": sum(utils) / len(utils) if utils else None,
        "train_loss": _last(records, "train/loss_epoch"), "val_loss": _last(records, "val/loss"),
        "test_loss": _last(records, "test/loss"),
        "time_to_target_s": reached - started if reached is not None and started is not None else None,
        "metrics": {k: _last(records, f"test/{k}") for k in SCORE_KEYS},
        # the embedded set's findings scores where its labels exist; absent on user data
        **_present("findings", {k: _last(records, f"test/{k}") for k in FINDINGS_KEYS[:2]}),
        "baseline": {k: _last(records, f"baseline_test/{k}") for k in ("BLEU_4", *FINDINGS_KEYS[:2])},
        "generation_samples_per_s": _last(records, "perf/test_generate_samples_per_s"),
        "loss_curve": [[r["step"], r["train/loss"]] for r in records if r.get("train/loss") is not None],
        "test_reports": json.loads(tests[-1].read_text(encoding="utf-8")) if tests else [],
    }


def _figure(run: dict, key: str) -> float | None:
    """One of SPREAD_KEYS from a run's collected numbers."""
    if key == "findings_macro_f1":
        return (run.get("findings") or {}).get(key)
    if key == "BLEU_4":
        return (run.get("metrics") or {}).get(key)
    return run.get(key)


def _mean(values: list) -> float | None:
    found = [v for v in values if v is not None]
    return sum(found) / len(found) if found else None


def aggregate(precision: str, runs: list[dict]) -> dict:
    """A precision's row from its runs (one per seed): "done" once every seed's run is; each figure the
    mean over the finished runs (peak memory: the largest), the first run's loss curve, batch and
    reports, and the spread of SPREAD_KEYS over seeds."""
    row = {"precision": precision, "runs": runs}
    unfinished = next((r for r in runs if r["status"] != "done"), None)
    row["status"], row["reason"] = (unfinished["status"], unfinished.get("reason")) if unfinished else ("done", None)
    done = [r for r in runs if r["status"] == "done"]
    row["wall_s"] = sum(r.get("wall_s") or 0.0 for r in runs) or None
    if not done:
        return row
    first = done[0]
    row |= {key: first.get(key) for key in ("run_dir", "micro_batch", "engine", "baseline", "loss_curve",
                                            "test_reports")}
    for key in ("samples_per_s", "gpu_util_pct", "train_loss", "val_loss", "test_loss", "generation_samples_per_s"):
        row[key] = _mean([r.get(key) for r in done])
    peaks = [r["peak_vram_gib"] for r in done if r.get("peak_vram_gib") is not None]
    row["peak_vram_gib"] = max(peaks) if peaks else None
    times = [r.get("time_to_target_s") for r in done]
    row["time_to_target_s"] = _mean(times) if all(t is not None for t in times) else None
    row["reached_target"] = sum(t is not None for t in times)
    row["metrics"] = {k: _mean([(r.get("metrics") or {}).get(k) for r in done]) for k in SCORE_KEYS}
    if any("findings" in r for r in done):
        row["findings"] = {k: _mean([(r.get("findings") or {}).get(k) for r in done]) for k in FINDINGS_KEYS[:2]}
    row["seeds"] = [r.get("seed") for r in done]
    row["spread"] = {key: stored(_figure(r, key) for r in done) for key in SPREAD_KEYS}
    return row


def quality_key(rows: list[dict]) -> str:
    """What the rule compares: findings macro-F1 where the data has findings labels, else BLEU-4."""
    labelled = any((r.get("spread") or {}).get("findings_macro_f1") for r in rows if r.get("status") == "done")
    return "findings_macro_f1" if labelled else "BLEU_4"


def _quality_spreads(rows: list[dict]) -> dict[str, Spread]:
    """Each finished precision's test quality over its seeds (quality_key's figure), where it has one."""
    key = quality_key(rows)
    return {r["precision"]: Spread.from_dict(r["spread"][key]) for r in rows
            if r["status"] == "done" and (r.get("spread") or {}).get(key)}


def recommend(rows: list[dict]) -> str | None:
    """RULE over the finished rows."""
    speeds = {r["precision"]: r["samples_per_s"] for r in rows
              if r["status"] == "done" and r.get("samples_per_s") is not None}
    spreads = {name: spread for name, spread in _quality_spreads(rows).items() if name in speeds}
    if not spreads:
        return None
    best = max(spreads, key=lambda name: spreads[name].mean)
    good = [name for name, spread in spreads.items() if name == best or within_spread(spread, spreads[best])]
    return max(good, key=lambda name: (round(speeds[name], 6), -WIDTH_ORDER.index(name)))


def comparisons(rows: list[dict]) -> dict[str, str]:
    """Each finished precision's quality against the best's: "best", or launcher.spread.verdict's
    ("within the spread", "outside the spread", "one run on a side: no spread measured")."""
    spreads = _quality_spreads(rows)
    if not spreads:
        return {}
    best = max(spreads, key=lambda name: spreads[name].mean)
    return {name: "best" if name == best else verdict(spread, spreads[best]) for name, spread in spreads.items()}


def with_samples(rows: list[dict]) -> list[dict]:
    """Each finished row's reports for the same SAMPLES test studies (the first ids common to all), its
    runs without their reports and curves (the page's copy; summary.json keeps them whole)."""
    done = [r for r in rows if r["status"] == "done"]
    common = set.intersection(*({x["id"] for x in r.get("test_reports", [])} for r in done)) if done else set()
    ids = sorted(common)[:SAMPLES]
    out = []
    for row in rows:
        page_row = {k: v for k, v in row.items() if k not in ("test_reports", "runs")}
        page_row["runs"] = [{k: v for k, v in run.items() if k not in ("test_reports", "loss_curve")}
                            for run in row.get("runs", [])]
        if row["status"] == "done":
            by_id = {x["id"]: x for x in row.get("test_reports", [])}
            page_row["samples"] = [by_id[i] for i in ids]
        out.append(page_row)
    return out


def _hardware(device: str) -> str:
    import torch

    from launcher.hardware import detect

    facts = detect()
    if device == "cuda" and facts.gpus:
        names = sorted({g.name for g in facts.gpus})
        return f"{', '.join(names)} ({len(facts.gpus)} GPU), torch {torch.__version__}"
    return f"CPU ({facts.host.usable_cpus} cores, {facts.host.ram_total_gib:.0f} GiB), torch {torch.__version__}"


def _write(request: StudyRequest, rows: list[dict], epochs: int | None, hardware: str) -> dict:
    from r2gen.atomic import write_json
    from launcher.report import write_report

    summary = {"title": "r2gen-launch precision study", "created": datetime.now(timezone.utc).isoformat(),
               "hardware": hardware, "preset": request.preset, "backend": request.backend, "epochs": epochs,
               "seeds": request.seeds, "target_f1": request.target_f1, "rule": RULE, "quality_key": quality_key(rows),
               "recommended": recommend(rows), "comparisons": comparisons(rows), "precisions": with_samples(rows)}
    # summary.json keeps the full test reports per run (with_samples trims them for the page).
    write_json(request.folder / "summary.json", {**summary, "precisions": rows})
    write_report(summary, request.folder / "report.html")
    return summary


def _pending(seed: int | None) -> dict:
    return {"seed": seed, "status": "pending", "reason": None}


def run_study(request: StudyRequest, epochs: int | None, verdicts: dict[str, dict[str, str]], say) -> dict:
    """Run (or continue) the study; returns the summary as written to summary.json (trimmed)."""
    from launcher.spawn import repo_env

    request.folder.mkdir(parents=True, exist_ok=True)
    previous = {}
    summary_path = request.folder / "summary.json"
    if summary_path.is_file():
        stored = json.loads(summary_path.read_text(encoding="utf-8"))
        if stored.get("backend") != request.backend or stored.get("preset") != request.preset:
            raise ConfigError(f"--name: {request.folder} holds a study of {stored.get('backend')} on the "
                              f"{stored.get('preset')} preset; choose another --name")
        previous = {r["precision"]: {run.get("seed"): run for run in r.get("runs", [])} for r in stored["precisions"]}
    hardware = _hardware(request.device)
    rows = [aggregate(p, [previous.get(p, {}).get(seed) or _pending(seed) for seed in request.seeds])
            for p in request.precisions]
    for i, precision in enumerate(request.precisions):
        reason = skip_reason(request.backend, precision, verdicts)
        if reason:
            rows[i] = {"precision": precision, "status": "skipped", "reason": reason, "runs": []}
            say(f"study: {precision} skipped: {reason}")
            _write(request, rows, epochs, hardware)
            continue
        runs = rows[i]["runs"]
        for j, seed in enumerate(request.seeds):
            label = seed_run_name(precision, seed)
            if runs[j]["status"] == "done":
                say(f"study: {label} finished before; kept")
                continue
            run_dir = request.folder / "runs" / label
            resume = (run_dir / "checkpoints" / "manifest.json").is_file()
            if run_dir.exists() and not resume:
                shutil.rmtree(run_dir)  # started but never saved: nothing to continue
            command = run_command(request, precision, seed, resume)
            say(f"study: {label} {'continues' if resume else 'starts'}: {' '.join(command[2:])}")
            # a continued run's time to the target counts from its first start
            started, began = (runs[j].get("started_unix") if resume else None) or time.time(), time.perf_counter()
            try:
                code = subprocess.run(command, env=repo_env()).returncode
            except KeyboardInterrupt:
                code = 130
            wall = float(runs[j].get("wall_s") or 0.0) + time.perf_counter() - began
            done = {"seed": seed, "wall_s": wall, "started_unix": started}
            if code == 0:
                runs[j] = done | {"status": "done", "reason": None, **collect(run_dir, started, request.target_f1)}
            elif code == 2:
                runs[j] = done | {"status": "skipped", "reason": "refused by the training command (its error line is above)"}
            elif code >= 128:
                runs[j] = done | {"status": "pending",
                                  "reason": f"interrupted (exit {code}); run the same study command to continue it"}
                rows[i] = aggregate(precision, runs)
                _write(request, rows, epochs, hardware)
                raise StudyInterrupted(code)
            else:
                runs[j] = done | {"status": "failed", "reason": f"the training run exited with code {code}; see {run_dir}"}
            rows[i] = aggregate(precision, runs)
            _write(request, rows, epochs, hardware)
            if runs[j]["status"] == "skipped":
                break  # refused: the other seeds would be too
    return _write(request, rows, epochs, hardware)


class StudyInterrupted(RunFailed):
    def __init__(self, code: int):
        super().__init__(f"study interrupted (exit {code}); finished precisions are kept in summary.json, run the "
                         "same command to continue")
        self.exit_code = code
