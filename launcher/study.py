"""The precision study: one training run per precision (each with its own probed batch), the numbers
side by side in study/summary.json, and a self-contained study/report.html.

Each run is the ordinary training command in its own process (`r2gen-launch <engine> --precision P
--run-dir <study>/runs --name P`), so memory, probe and engine state never carry over. The study is
resumable: summary.json is rewritten after every precision; run again, finished precisions are
kept, an interrupted one continues with --keep-training, the rest start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from launcher.run_report import read_records
from r2gen.errors import ConfigError, RunFailed
from r2gen.findings import FINDINGS_KEYS
from r2gen.scores import SCORE_KEYS

STUDY_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
STUDY_BACKENDS = ("plain", "accelerate", "deepspeed")
SAMPLES = 5
BLEU4_MARGIN = 0.02
RULE = (f"the fastest finished precision (train samples/s) whose test BLEU-4 is at most {BLEU4_MARGIN} below the "
        "study's best test BLEU-4; on a tie, the wider format (fp32, then bf16, fp16, fp8)")
WIDTH_ORDER = ("fp32", "bf16", "fp16", "fp8")


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


def run_command(request: StudyRequest, precision: str, resume: bool) -> list[str]:
    engine = engine_for(request.backend, precision)
    command = [sys.executable, "-m", "launcher.cli", engine, "--run-dir", str(request.folder / "runs"),
               "--name", precision]
    if resume:
        return [*command, "--keep-training"]
    if engine == request.backend:  # the study's backend takes --precision; FP8 is its own engine's only one
        command += ["--precision", precision]
    return [*command, "--device", request.device, "--preset", request.preset, *request.run_args]


def _last(records: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _present(name: str, scores: dict) -> dict:
    """{name: scores} when any score was logged, else {} (the key absent, not zeros)."""
    return {name: scores} if any(v is not None for v in scores.values()) else {}


def collect(run_dir: Path) -> dict:
    """A finished run's numbers, from its metrics.jsonl, plan.json and last test reports."""
    records = read_records(run_dir / "metrics.jsonl")
    utils = [r["gpu/util_pct"] for r in records if r.get("gpu/util_pct") is not None]
    plan = json.loads((run_dir / "plan.json").read_text(encoding="utf-8"))
    tests = sorted((run_dir / "reports").glob("test_epoch*.json"))
    return {
        "run_dir": str(run_dir), "micro_batch": plan["batch"]["micro_batch"],
        "samples_per_s": _last(records, "perf/train_samples_per_s"),
        "peak_vram_gib": _last(records, "memory/peak_allocated_gib"),
        "gpu_util_pct": sum(utils) / len(utils) if utils else None,
        "train_loss": _last(records, "train/loss_epoch"), "val_loss": _last(records, "val/loss"),
        "test_loss": _last(records, "test/loss"),
        "metrics": {k: _last(records, f"test/{k}") for k in SCORE_KEYS},
        # the embedded set's findings scores where its labels exist; absent on user data
        **_present("findings", {k: _last(records, f"test/{k}") for k in FINDINGS_KEYS[:2]}),
        "baseline": {k: _last(records, f"baseline_test/{k}") for k in ("BLEU_4", *FINDINGS_KEYS[:2])},
        "generation_samples_per_s": _last(records, "perf/test_generate_samples_per_s"),
        "loss_curve": [[r["step"], r["train/loss"]] for r in records if r.get("train/loss") is not None],
        "test_reports": json.loads(tests[-1].read_text(encoding="utf-8")) if tests else [],
    }


def recommend(rows: list[dict]) -> str | None:
    """RULE over the finished rows."""
    done = [r for r in rows if r["status"] == "done" and r.get("samples_per_s") is not None]
    scored = [r for r in done if r["metrics"].get("BLEU_4") is not None]
    if not scored:
        return None
    best = max(r["metrics"]["BLEU_4"] for r in scored)
    good = [r for r in scored if r["metrics"]["BLEU_4"] >= best - BLEU4_MARGIN]
    return max(good, key=lambda r: (round(r["samples_per_s"], 6), -WIDTH_ORDER.index(r["precision"])))["precision"]


def with_samples(rows: list[dict]) -> list[dict]:
    """Each finished row's reports for the same SAMPLES test studies (the first ids common to all)."""
    done = [r for r in rows if r["status"] == "done"]
    common = set.intersection(*({x["id"] for x in r.get("test_reports", [])} for r in done)) if done else set()
    ids = sorted(common)[:SAMPLES]
    out = []
    for row in rows:
        page_row = {k: v for k, v in row.items() if k != "test_reports"}
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
               "rule": RULE, "recommended": recommend(rows), "precisions": with_samples(rows)}
    # summary.json keeps the full test reports per run (with_samples trims them for the page).
    write_json(request.folder / "summary.json", {**summary, "precisions": rows})
    write_report(summary, request.folder / "report.html")
    return summary


def run_study(request: StudyRequest, epochs: int | None, verdicts: dict[str, dict[str, str]], say) -> dict:
    """Run (or continue) the study; returns the summary as written to summary.json (trimmed)."""
    request.folder.mkdir(parents=True, exist_ok=True)
    previous = {}
    summary_path = request.folder / "summary.json"
    if summary_path.is_file():
        stored = json.loads(summary_path.read_text(encoding="utf-8"))
        if stored.get("backend") != request.backend or stored.get("preset") != request.preset:
            raise ConfigError(f"--name: {request.folder} holds a study of {stored.get('backend')} on the "
                              f"{stored.get('preset')} preset; choose another --name")
        previous = {r["precision"]: r for r in stored["precisions"]}
    hardware = _hardware(request.device)
    rows = [previous.get(p, {"precision": p, "status": "pending", "reason": None}) for p in request.precisions]
    for i, precision in enumerate(request.precisions):
        row = rows[i]
        if row["status"] == "done":
            say(f"study: {precision} finished before; kept")
            continue
        reason = skip_reason(request.backend, precision, verdicts)
        if reason:
            rows[i] = {"precision": precision, "status": "skipped", "reason": reason}
            say(f"study: {precision} skipped: {reason}")
            _write(request, rows, epochs, hardware)
            continue
        run_dir = request.folder / "runs" / precision
        resume = (run_dir / "checkpoints" / "manifest.json").is_file()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # started but never saved: nothing to continue
        command = run_command(request, precision, resume)
        say(f"study: {precision} {'continues' if resume else 'starts'}: {' '.join(command[2:])}")
        began = time.perf_counter()
        try:
            code = subprocess.run(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}).returncode
        except KeyboardInterrupt:
            code = 130
        wall = float(row.get("wall_s") or 0.0) + time.perf_counter() - began
        if code == 0:
            rows[i] = {"precision": precision, "status": "done", "reason": None, "wall_s": wall, **collect(run_dir)}
        elif code == 2:
            rows[i] = {"precision": precision, "status": "skipped", "wall_s": wall,
                       "reason": "refused by the training command (its error line is above)"}
        elif code >= 128:
            rows[i] = {"precision": precision, "status": "pending", "wall_s": wall,
                       "reason": f"interrupted (exit {code}); run the same study command to continue it"}
            _write(request, rows, epochs, hardware)
            raise StudyInterrupted(code)
        else:
            rows[i] = {"precision": precision, "status": "failed", "wall_s": wall,
                       "reason": f"the training run exited with code {code}; see {run_dir}"}
        _write(request, rows, epochs, hardware)
    return _write(request, rows, epochs, hardware)


class StudyInterrupted(RunFailed):
    def __init__(self, code: int):
        super().__init__(f"study interrupted (exit {code}); finished precisions are kept in summary.json, run the "
                         "same command to continue")
        self.exit_code = code
