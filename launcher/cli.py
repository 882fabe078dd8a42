"""`r2gen-launch`: thin Typer commands. They parse, call and print; decisions live elsewhere."""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from launcher.options import *  # noqa: F403 - every option's Annotated type, defined once
from launcher.runlock import RunLock
from r2gen.errors import BackendError, ConfigError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train R2Gen (radiology report generation) as fast as the hardware allows.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: the embedded synthetic set; a set prepared at training resolution.")
app.add_typer(data_app, name="data")


@app.callback()
def _main_options(version: Version = False) -> None:
    """Train R2Gen (radiology report generation) as fast as the hardware allows."""

out = Console()
err = Console(stderr=True)
TORCHAO_UNTIMED = ("fp8 not timed: without Transformer Engine only torchao's float8 is here, 11x slower than bf16 "
                   "on R2Gen's small matrices (an H200, micro-batch 65: 59 vs 643 samples/s); `r2gen-launch fp8` runs it")
"""Why auto skips the bf16-vs-fp8 timing (24 s of a 3-minute run) when FP8 would be torchao's."""

def _fail(exc: UsageError) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _parse_val_every(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    if value == "last":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--val-every: expected a number of epochs or 'last', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--val-every: must be at least 1 (or 'last'), got {n}")
    return n


def _prepare_run(backend_name: str, device: str, precision: str, preset_name: str, overrides: dict,
                 options, ann_path: Optional[Path], image_dir: Optional[Path], visual_weights: Optional[Path],
                 thresholds_path: Optional[Path], run_dir: Optional[Path] = None, name: Optional[str] = None,
                 world_size: int = 1, gpus_here: int = 1, engine: Optional[dict] = None):
    """Validate everything, probe, plan. Writes nothing. Returns (prepared run, plan, run directory).

    `world_size` counts every process of the run (all nodes), `gpus_here` this machine's."""
    from backends.registry import build_backend
    from launcher.hardware import detect
    from launcher.engine_config import DeepSpeedOptions
    from launcher.plan import EngineChoice, check_engine_device, gpu_budget, make_plan
    from launcher.thresholds import load_thresholds
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.prepare import preparation_hint, prepared_image_size
    from r2gen.data.synth import default_dataset
    from r2gen.train import prepare
    from r2gen.wandb_log import check_wandb

    engine = engine or {}
    if backend_name == "deepspeed":
        DeepSpeedOptions(**engine)  # --zero/--offload checked before any work
    thresholds = load_thresholds(thresholds_path)
    check_engine_device(backend_name, device, world_size)
    if device == "cuda" and gpus_here > 1:
        import torch

        if torch.cuda.device_count() < gpus_here:
            raise BackendError(f"--gpus {gpus_here}: only {torch.cuda.device_count()} GPU(s) visible")
    cfg = preset(preset_name).replace(**{k: v for k, v in overrides.items() if v is not None})
    if cfg.wandb:
        check_wandb(cfg.wandb_mode)
    auto = backend_name == "auto"
    if auto:
        backend_name = "plain"  # what auto measures first; _auto_engine may pick another engine
    backend = build_backend(backend_name, device, precision, fp8_impl=engine.get("fp8_impl", "auto"))
    options.effective_for(cfg)  # --batch-size against the effective batch, before any work
    target = None
    if run_dir is not None:
        target = run_dir / (name or f"{cfg.preset}-{backend_name}-{datetime.now():%Y%m%d-%H%M%S}")
        if _holds_a_run(target):
            raise ConfigError(f"--run-dir/--name: {target} already holds a run; choose another --name")
    embedded = ann_path is None
    if embedded:
        if overrides.get("epochs") is None and cfg.embedded_epochs:
            cfg = cfg.replace(epochs=cfg.embedded_epochs)
        if image_dir is not None:
            raise ConfigError("--image-dir needs --ann-path (the embedded set has its own images)")
        err.print(f"No --ann-path: using the embedded synthetic set ({cfg.studies} studies).")
        ann_path = default_dataset(studies=cfg.studies)
    annotation = load_annotation(ann_path, image_dir, cfg.model.dataset, progress=True)
    prepared_for = prepared_image_size(annotation.path)
    if prepared_for is not None and prepared_for != cfg.image_size:
        err.print(f"[yellow]warning:[/] {annotation.path} was prepared for --image-size {prepared_for}, this run uses "
                  f"{cfg.image_size}: its images are resized a second time (run `data prepare` again for "
                  f"{cfg.image_size})", highlight=False)
    elif prepared_for is None and not embedded and (hint := preparation_hint(annotation, cfg.image_size)):
        err.print(f"[yellow]hint:[/] {hint}", highlight=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = prepare(cfg, backend, annotation, visual_weights)
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    n = {s: len(v) for s, v in annotation.splits.items()}
    err.print(f"{backend.describe()} | {cfg.preset} preset, {cfg.model.backbone} | "
              f"{n['train']}/{n['val']}/{n['test']} train/val/test studies from {annotation.path} | "
              f"vocabulary {len(prep.tokenizer)} | {sum(p.numel() for p in prep.model.parameters()):,} parameters"
              + (f" | run dir {target}" if target else ""), highlight=False)

    facts = detect()
    probe = None
    if backend.device.type == "cuda" and options.probe:
        from launcher.probe import ProbeRequest, probe_in_subprocess

        budget, _ = gpu_budget(facts, options, thresholds)
        request = ProbeRequest(cfg, len(prep.tokenizer), precision, budget,
                               options.probe_cap(cfg, n["train"], world_size, thresholds.min_steps_per_epoch),
                               backend=backend.name,
                               verify=options.batch_size or 0, others_gib=facts.gpus[0].used_by_others_gib,
                               engine=engine)
        with _status("probing GPU memory with real training steps..."):
            probe = probe_in_subprocess(request).to_dict()
    choice = None
    if auto:
        choice, probe = _auto_engine(request, probe, facts, thresholds) if probe else (EngineChoice(
            "plain", precision, {}, "plain: on a CPU" if device == "cpu" else "plain: --no-probe, nothing measured"),
            probe)
        backend_name, precision, engine = choice.backend, choice.precision, choice.engine
        if backend_name != backend.name:
            prep.backend = build_backend(backend_name, device, precision, fp8_impl=engine.get("fp8_impl", "auto"))
        err.print(f"auto: {choice.reason}", highlight=False)
    plan = make_plan(backend_name, device, precision, cfg, facts, thresholds, options, sum(n.values()), probe,
                     world_size=world_size, engine=engine, choice=choice,
                     disk=_disk_space(run_dir, prep) if run_dir is not None else None, train_studies=n["train"])
    return prep, plan, target


def _disk_space(run_dir: Path, prep):
    """The run directory's free space and one resumable checkpoint's size, for the plan's disk row."""
    from launcher.plan import DiskSpace
    from r2gen.checkpoint import free_bytes, model_checkpoint_bytes

    each = model_checkpoint_bytes(prep.model, prep.cfg.amsgrad, prep.backend.saves_engine)
    return DiskSpace(str(run_dir), free_bytes(run_dir), each, prep.cfg.keep_last)


def _auto_engine(request, probe: dict, facts, thresholds):
    """auto's measurements beyond the plain probe: ZeRO-2 CPU offload when too little fits, a short
    bf16-vs-fp8 timing where FP8 can run. Returns (EngineChoice, the probe of the chosen engine)."""
    from dataclasses import replace

    from backends.fp8 import MIN_CAPABILITY, installed
    from launcher.plan import choose_auto_engine
    from launcher.probe import in_subprocess, measure_speeds, probe_in_subprocess

    micro = probe["micro_batch"]
    if micro < 1:
        return choose_auto_engine(request.precision, micro, thresholds), probe
    if micro < thresholds.useful_micro_batch:
        offload = replace(request, backend="deepspeed", engine={"zero": 2, "offload": "cpu"})
        with _status("probing DeepSpeed ZeRO-2 with CPU offload..."):
            offload_probe = probe_in_subprocess(offload).to_dict()
        choice = choose_auto_engine(request.precision, micro, thresholds, offload_probe["micro_batch"])
        return choice, offload_probe if choice.backend == "deepspeed" else probe
    speeds, untimed = None, ""
    if request.precision == "bf16" and facts.gpus[0].capability >= MIN_CAPABILITY:
        if installed("transformer_engine"):
            engines = (("plain", "bf16", {}), ("fp8", "fp8", {"fp8_impl": "te"}))
            with _status(f"timing bf16 against fp8 at micro-batch {micro}..."):
                speeds = in_subprocess(measure_speeds, request, engines, micro)
        elif installed("torchao"):
            untimed = TORCHAO_UNTIMED
    return choose_auto_engine(request.precision, micro, thresholds, speeds=speeds, untimed=untimed), probe


@contextlib.contextmanager
def _status(text: str):
    """A spinner on a terminal; plain lines (start, and how long it took) in a log file, where rich's
    spinner would print nothing."""
    if err.is_terminal:
        with err.status(text):
            yield
        return
    began = time.perf_counter()
    err.print(text, highlight=False, soft_wrap=True)
    yield
    err.print(f"{text.rstrip('.')}: done in {time.perf_counter() - began:.1f} s", highlight=False, soft_wrap=True)


def _print_plan(plan) -> None:
    table = Table(title="plan", title_justify="left")
    for column in ("decision", "value", "reason"):
        table.add_column(column, overflow="fold")
    for row in plan.rows():
        table.add_row(*row)
    err.print(table)
    for warning in plan.warnings():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def _run_training(backend_name: str, device: str, precision: str, preset_name: str, overrides: dict, options,
                  ann_path: Optional[Path], image_dir: Optional[Path], visual_weights: Optional[Path],
                  thresholds_path: Optional[Path], run_dir: Path, name: Optional[str], dry_run: bool,
                  topology=None, engine: Optional[dict] = None, hostfile: Optional[Path] = None,
                  keep_training: bool = False, preset_given: Optional[str] = None,
                  user_file: tuple = (None, None)) -> None:
    """A new run (or, with keep_training, the continued one). `user_file`: the settings and path of
    --ds-config / --accelerate-config, merged into the engine config the plan generates."""
    from launcher.engine_config import Topology, engine_config_for
    from launcher.plan import apply_plan
    from r2gen.train import train

    if keep_training:
        if user_file[1] is not None:
            raise ConfigError(f"--keep-training: a continued run keeps its own engine config (in its run directory); "
                              f"drop {user_file[1]}")
        _continue_training(backend_name, overrides, options, run_dir, name, dry_run, topology, hostfile, preset_given,
                           thresholds_path)
        return
    topology = topology or Topology()
    prep, plan, target = _prepare_run(backend_name, device, precision, preset_name, overrides, options, ann_path,
                                      image_dir, visual_weights, thresholds_path, run_dir, name,
                                      world_size=topology.world_size, gpus_here=topology.gpus_per_node,
                                      engine=engine)
    _print_plan(plan)
    engine_file = engine_config_for(plan, topology, target, *user_file)
    if dry_run:
        if topology.world_size > 1:
            _launch_processes(prep, apply_plan(prep.cfg, plan), plan, target, visual_weights, topology, engine_file,
                              hostfile, dry_run)
        else:
            out.print(f"engine config: {_describe_config(engine_file)}\n"
                      f"launch: this process, one {plan.device} device; run directory {target} (not created)",
                      highlight=False)
        return
    with RunLock(target):
        if _holds_a_run(target):  # another command started this run while we planned
            raise ConfigError(f"--run-dir/--name: {target} already holds a run; choose another --name")
        _write_versions(target)
        if topology.world_size > 1:
            _launch_processes(prep, apply_plan(prep.cfg, plan), plan, target, visual_weights, topology, engine_file,
                              hostfile, dry_run)
            return
        _start_engine(prep, plan, engine_file)
        prep.cfg = apply_plan(prep.cfg, plan)
        result = train(prep, target, err, plan.to_json())
    _print_result(result)


def _holds_a_run(target: Path) -> bool:
    from launcher.runlock import LOCK_NAME

    return target.is_dir() and any(p.name != LOCK_NAME for p in target.iterdir())


def _write_versions(target: Path) -> None:
    """<run>/versions.json: this package, Python, torch, CUDA and the engines a run was made with."""
    import platform

    from launcher.environment import own_version, versions
    from r2gen.checkpoint import write_json

    write_json(target / "versions.json", {"r2gen-launch": own_version(), "python": platform.python_version(),
                                          **versions()})


def _continue_training(backend_name: str, overrides: dict, options, run_dir: Path, name: Optional[str],
                       dry_run: bool, topology, hostfile: Optional[Path], preset_given: Optional[str],
                       thresholds_path: Optional[Path]) -> None:
    """--keep-training: take the run's lock, check the run, rebuild it from its own files, re-plan the
    micro-batch, continue."""
    from launcher.resume import find_run, is_run

    target = find_run(run_dir, name)
    if dry_run or not is_run(target):  # writes nothing; a folder that is not a run is refused there, unlocked
        _continue_locked(target, backend_name, overrides, options, dry_run, topology, hostfile, preset_given,
                         thresholds_path)
        return
    with RunLock(target):  # before reading it: the run's files are ours until we exit
        _continue_locked(target, backend_name, overrides, options, dry_run, topology, hostfile, preset_given,
                         thresholds_path)


def _continue_locked(target: Path, backend_name: str, overrides: dict, options, dry_run: bool, topology,
                     hostfile: Optional[Path], preset_given: Optional[str], thresholds_path: Optional[Path]) -> None:
    from dataclasses import replace

    from backends.registry import build_backend
    from launcher.engine_config import engine_config_for, stored_engine_file
    from launcher.resume import check_request, continued_config, read_run, resume_batch
    from r2gen.data.datasets import load_annotation
    from r2gen.train import prepare, train
    from r2gen.wandb_log import check_wandb

    run = read_run(target)
    check_request(run, backend_name, preset_given, overrides)
    plan = run.plan
    if topology is None:  # neither --gpus nor --nodes: as many processes as the run had, on this machine
        topology = _topology(plan.batch.world_size, 1, 0, "127.0.0.1", None)
    if topology.world_size != plan.batch.world_size:
        raise ConfigError(f"--gpus/--nodes: {run.path} trained with {plan.batch.world_size} process(es); continue it "
                          "with as many, or leave --gpus/--nodes out (each process's share of the data depends on it)")
    for warning in run.warnings:
        err.print(f"[yellow]warning:[/] skipping {warning}", highlight=False)
    backend = build_backend(plan.backend, plan.device, plan.precision, fp8_impl=plan.engine.get("fp8_impl", "auto"))
    annotation = load_annotation(run.annotation, run.image_dir, run.cfg.model.dataset, progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the visual extractor's weights come from the checkpoint
        prep = prepare(run.cfg, backend, annotation, None)
    if prep.tokenizer.to_json() != (run.path / "tokenizer.json").read_text(encoding="utf-8"):
        raise ConfigError(f"--keep-training: {run.annotation} changed since {run.path} started (its vocabulary "
                          "differs); start a new run")
    if plan.device == "cuda" and options.probe:
        from launcher.hardware import detect
        from launcher.plan import gpu_budget
        from launcher.probe import ProbeRequest, probe_in_subprocess
        from launcher.thresholds import load_thresholds

        facts = detect()
        budget, _ = gpu_budget(facts, options, load_thresholds(thresholds_path))
        window = plan.batch.micro_batch * plan.batch.accumulation
        request = ProbeRequest(run.cfg, len(prep.tokenizer), plan.precision, budget, window, backend=plan.backend,
                               others_gib=facts.gpus[0].used_by_others_gib, engine=plan.engine)
        with _status("re-probing GPU memory..."):
            probe = probe_in_subprocess(request).to_dict()
        plan = replace(plan, batch=resume_batch(plan.batch, probe["micro_batch"]), probe=probe)
    prep.cfg = continued_config(run, overrides, plan.batch.micro_batch)
    if prep.cfg.wandb:
        check_wandb(prep.cfg.wandb_mode)
    _print_plan(plan)
    err.print(f"continuing {run.path} from {run.checkpoint.name}", highlight=False)
    engine_file = engine_config_for(plan, topology, run.path, stored_engine_file(plan, run.path))
    if not dry_run:  # every check passed: the run goes on
        _write_versions(run.path)
    if topology.world_size > 1:
        _launch_processes(prep, prep.cfg, plan, run.path, None, topology, engine_file, hostfile, dry_run,
                          resume=run.checkpoint)
        return
    if dry_run:
        out.print(f"launch: this process, continuing {run.path} (nothing written)", highlight=False)
        return
    _start_engine(prep, plan, engine_file)
    result = train(prep, run.path, err, plan.to_json(), resume=run.checkpoint)
    _print_result(result)


def _describe_config(engine) -> str:
    if engine is None:
        return "none (this engine needs no config file)"
    return f"{engine.path} (not written)\n{engine.text}"


def _write_engine_config(engine) -> None:
    from launcher.engine_config import write_engine_config

    if engine is not None:
        err.print(f"engine config: {write_engine_config(engine)}", highlight=False)


def _start_engine(prep, plan, engine_file) -> None:
    """One process, new or continued run: write the engine's config and hand it to the engine (DeepSpeed's
    prepare() needs it; the others read nothing)."""
    _write_engine_config(engine_file)
    if plan.backend == "deepspeed":
        prep.backend.configure(engine_file.config)


def _launch_processes(prep, cfg, plan, target: Path, visual_weights: Optional[Path], topology, engine_file,
                      hostfile: Optional[Path], dry_run: bool, resume: Optional[Path] = None) -> None:
    """Write launch.json into the run directory and start one worker per process with the engine's launcher."""
    import os

    from launcher.spawn import launch_command, run_command
    from r2gen.checkpoint import write_json

    launch = target / "launch.json"
    command = launch_command(plan.backend, topology, ["--launch", str(launch)],
                             engine_config=engine_file.path if engine_file else None, hostfile=hostfile)
    if dry_run:
        out.print(f"engine config: {_describe_config(engine_file)}\nlaunch: {' '.join(command)}\n"
                  f"run directory {target} (not created)", highlight=False)
        return
    spec = {"backend": plan.backend, "device": plan.device, "precision": plan.precision, "engine": plan.engine,
            "engine_config": str(engine_file.path.resolve()) if engine_file else None,
            "config": cfg.to_dict(), "resume": str(resume) if resume else None,
            "annotation": str(prep.annotation.path), "image_dir": str(prep.annotation.image_dir),
            "visual_weights": str(visual_weights) if visual_weights else None, "run_dir": str(target),
            "plan": plan.to_json()}
    _write_engine_config(engine_file)
    write_json(launch, spec)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    err.print(f"launch: {' '.join(command)}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    code = run_command(command, env=env)
    if code:
        err.print(f"[bold red]failed:[/] the {topology.world_size} training processes exited with code {code}",
                  highlight=False)
        raise typer.Exit(code)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_result(result) -> None:
    from r2gen.findings import FINDINGS_KEYS
    from r2gen.metrics import METRIC_KEYS

    best = result.best_test if result.best_test and result.best_epoch != result.epochs_run else {}
    columns = [(label, scores) for label, scores in (("val", result.val), ("test", result.test),
                                                    (f"test, epoch {result.best_epoch}", best),
                                                    ("baseline val", result.baseline_val),
                                                    ("baseline test", result.baseline_test)) if scores]
    # Findings scores exist on the embedded set only (its labels); on user data the rows are left out.
    keys = [*METRIC_KEYS, *(k for k in FINDINGS_KEYS if any(s.get(k) is not None for _, s in columns))]
    table = Table(title=f"R2Gen scores after {result.epochs_run} epochs ({result.steps} steps); "
                        f"best val epoch {result.best_epoch}",
                  caption="val and test: the last model; test, epoch N: the best val epoch's (R2Gen's pick); "
                          "baseline: always answering the most frequent train report"
                          + ("; findings_*: read from each report with the embedded set's phrase tables, macro F1 "
                             "over its 8 abnormal findings, exact match of all 5" if len(keys) > len(METRIC_KEYS)
                             else ""))
    table.add_column("score")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for key in keys:
        table.add_row(key, *(_fmt(scores.get(key)) for _, scores in columns))
    out.print(table)
    speed = f"train {result.samples_per_s:.1f} samples/s"
    if result.peak_memory_gib is not None:
        speed += f", peak GPU memory {result.peak_memory_gib:.2f} GiB allocated"
    out.print(f"{speed}; run directory: {result.run_dir}", highlight=False)




def _options(batch_size, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling, num_workers,
             default_policy: str):
    from launcher.plan import PlanOptions

    return PlanOptions(batch_size=batch_size, probe=probe, target_util_pct=target_util, max_vram_gib=max_vram,
                       effective_batch=effective_batch, batch_policy=batch_policy or default_policy,
                       lr_scaling=lr_scaling, num_workers=num_workers)


def _guarded(run) -> None:
    """Exit 2 for bad input, 1 (with what was saved) for a run that failed while running, 128 + the
    signal for a run stopped by SIGTERM/Ctrl-C after saving."""
    from r2gen.errors import RunFailed

    try:
        run()
    except UsageError as exc:
        _fail(exc)
    except RunFailed as exc:
        from r2gen.train import Stopped

        label = "[bold yellow]stopped:[/]" if isinstance(exc, Stopped) else "[bold red]failed:[/]"
        err.print(f"{label} {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None



def _keyword(name: str, default, annotation) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


ENGINE_OPTIONS: dict[str, list[inspect.Parameter]] = {
    "deepspeed": [_keyword("zero", None, TrainZero), _keyword("offload", None, TrainOffload),
                  _keyword("ds_config", None, DsConfig), _keyword("hostfile", None, Hostfile)],
    "accelerate": [_keyword("accelerate_config", None, AccelerateConfig)],
    "fp8": [_keyword("fp8_impl", "auto", Fp8Impl)],
}
"""Each engine's own options, added to its command's signature (and so to its help page); all but
the launcher's (--hostfile, and the user's own engine file) go to the plan as its engine options."""
ENGINE_FILE_FLAGS = {"ds_config": "--ds-config", "accelerate_config": "--accelerate-config"}


def _user_engine_file(engine: dict) -> tuple[Optional[dict], Optional[Path], dict]:
    """--ds-config / --accelerate-config (popped from the engine options): the file's settings, its path,
    and the choices it makes for the flags left out (precision, --zero, --offload)."""
    from launcher.engine_config import engine_file_choices, read_engine_file

    for key, flag in ENGINE_FILE_FLAGS.items():
        path = engine.pop(key, None)
        if path is not None:
            user = read_engine_file(path, flag)
            return user, path, engine_file_choices(user, flag)
    return None, None, {}


def _wandb_overrides(wandb: Optional[bool], mode: Optional[str], project: Optional[str],
                     name: Optional[str]) -> dict:
    """The --wandb options as config overrides; a W&B detail without --wandb is a mistake worth a line."""
    if wandb is False or (wandb is None and (mode or project or name)):
        given = [flag for flag, value in (("--wandb-mode", mode), ("--wandb-project", project),
                                          ("--wandb-name", name)) if value]
        if given:
            raise ConfigError(f"{given[0]}: needs --wandb")
    return dict(wandb=wandb, wandb_mode=mode, wandb_project=project, wandb_name=name)


def _topology(gpus: Optional[int], nodes: int, node_rank: int, master_addr: str, master_port: Optional[int],
              keep_training: bool = False):
    """The processes asked for; None where --keep-training should take the continued run's own
    (neither --gpus nor --nodes given)."""
    from launcher.engine_config import Topology
    from launcher.spawn import free_port

    if gpus is None and nodes == 1 and keep_training:
        return None
    if master_port is None:
        master_port = free_port() if nodes == 1 else 29500
    return Topology(gpus_per_node=1 if gpus is None else gpus, nodes=nodes, node_rank=node_rank,
                    master_addr=master_addr, master_port=master_port)


def _speedup_overrides(speedups: bool) -> dict:
    """--no-speedups as config overrides (--speedups keeps the configuration's own, on by default)."""
    from r2gen.config import STEP_SPEEDUPS

    return {} if speedups else {name: False for name in STEP_SPEEDUPS}


def _training_command(backend_name: str, summary: str):
    """One signature for every engine's training command (its help page is the signature), plus the
    engine's own options (ENGINE_OPTIONS)."""

    def command(
        preset: Preset = None, device: Device = None, precision: Precision = None,
        epochs: Epochs = None, batch_size: BatchSize = None, effective_batch: EffectiveBatch = None,
        batch_policy: BatchPolicy = None, lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None,
        max_vram: MaxVram = None, probe: Probe = True, image_size: ImageSize = None, dataset: Dataset = None,
        ann_path: AnnPath = None, image_dir: ImageDir = None, studies: Studies = None, backbone: Backbone = None,
        visual_weights: VisualWeights = None, val_every: ValEvery = None, early_stop: EarlyStop = None,
        beam_size: BeamSize = None, lr_ve: LrVe = None, lr_ed: LrEd = None, seed: Seed = None,
        num_workers: NumWorkers = None, max_steps_per_epoch: MaxSteps = None, log_every: LogEvery = None,
        gpus: Gpus = None, nodes: Nodes = 1, node_rank: NodeRank = 0, master_addr: MasterAddr = "127.0.0.1",
        master_port: MasterPort = None, save_every: SaveEvery = None, checkpoint_every: CheckpointEvery = None,
        test_every: TestEvery = None, keep_last: KeepLast = None,
        wandb: Wandb = None, wandb_mode: WandbMode = None, wandb_project: WandbProject = None,
        wandb_name: WandbName = None, keep_training: KeepTraining = False, thresholds: ThresholdsFile = None,
        run_dir: RunDir = Path("runs"), name: Name = None, dry_run: DryRun = False, speedups: Speedups = True,
        **engine,
    ) -> None:
        import torch

        def run() -> None:
            options = _options(batch_size, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                               num_workers, "faithful")
            overrides = dict(epochs=epochs, image_size=image_size, dataset=dataset,
                             studies=studies, backbone=backbone, val_every=_parse_val_every(val_every),
                             early_stop=early_stop, beam_size=beam_size, lr_ve=lr_ve, lr_ed=lr_ed, seed=seed,
                             max_steps_per_epoch=max_steps_per_epoch, log_every=log_every, save_every=save_every,
                             checkpoint_every_min=checkpoint_every, test_every=test_every,
                             keep_last=keep_last, **_wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name),
                             **_speedup_overrides(speedups))
            chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
            hostfile = engine.pop("hostfile", None)
            user_file = _user_engine_file(engine)
            file_choices = user_file[2]
            for key, default in (("zero", 2), ("offload", "cpu")):  # a flag, else the user's file, else the default
                if key in engine and engine[key] is None:
                    engine[key] = file_choices.get(key, default)
            _run_training(backend_name, chosen,
                          precision or file_choices.get("precision") or _default_precision(backend_name, chosen),
                          preset or "iu_xray", overrides, options, ann_path, image_dir, visual_weights, thresholds,
                          run_dir, name, dry_run, _topology(gpus, nodes, node_rank, master_addr, master_port,
                                                            keep_training), engine, hostfile, keep_training, preset,
                          user_file[:2])

        _guarded(run)

    # eval_str: this module's annotations are strings (PEP 563); typer reads help and defaults from the
    # Annotated objects, so the rebuilt signature must carry those, not their names.
    params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*params, *ENGINE_OPTIONS.get(backend_name, [])])  # type: ignore[attr-defined]
    command.__doc__ = summary
    return command


def _default_precision(backend_name: str, device: str) -> str:
    """plain: fp32, as R2Gen; fp8: fp8; the others mixed precision (bf16 where supported, else fp16) on a GPU."""
    import torch

    if backend_name == "fp8":
        return "fp8"
    if backend_name == "plain" or device == "cpu":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


app.command("plain")(_training_command(
    "plain", "Train and evaluate R2Gen with plain PyTorch (default fp32), from a probed plan; --gpus N: "
             "DistributedDataParallel under torchrun."))
app.command("accelerate")(_training_command(
    "accelerate", "Train and evaluate R2Gen through Hugging Face Accelerate (mixed precision; default bf16 on a "
                  "GPU, fp32 on a CPU), from a probed plan; --gpus N: accelerate launch with the generated YAML."))
app.command("deepspeed")(_training_command(
    "deepspeed", "Train and evaluate R2Gen with DeepSpeed ZeRO (stage 2 and CPU optimizer offload by default; "
                 "bf16, or fp16 with dynamic loss scaling), from a probed plan and the generated JSON; GPUs only."))
app.command("fp8")(_training_command(
    "fp8", "Train and evaluate R2Gen with FP8 Linear layers in the encoder-decoder (Transformer Engine where "
           "installed, else torchao float8; convolutions bf16), from a probed plan; GPUs of compute capability "
           "8.9+ only."))


@app.command()
def auto(
    epochs: Epochs = None, batch_size: BatchSize = None, effective_batch: EffectiveBatch = None,
    batch_policy: BatchPolicy = None, lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None,
    max_vram: MaxVram = None, probe: Probe = True, ann_path: AnnPath = None, image_dir: ImageDir = None,
    studies: Studies = None, visual_weights: VisualWeights = None, val_every: ValEvery = None,
    seed: Seed = None, num_workers: NumWorkers = None,
    gpus: AutoGpus = None,
    save_every: SaveEvery = None, checkpoint_every: CheckpointEvery = None, test_every: TestEvery = None,
    keep_last: KeepLast = None, wandb: Wandb = None, wandb_mode: WandbMode = None,
    wandb_project: WandbProject = None, wandb_name: WandbName = None, keep_training: KeepTraining = False,
    thresholds: ThresholdsFile = None, run_dir: RunDir = Path("runs"), name: Name = None, dry_run: DryRun = False,
    speedups: Speedups = True,
) -> None:
    """Pick device, engine, precision and a preset that fits, plan, then train and evaluate.

    On a GPU: the iu_xray preset (full ResNet-101 model), bf16 where supported (else fp16), the auto
    batch policy (the largest micro-batch the probe finds while an epoch keeps `min_steps_per_epoch`
    optimizer steps, else R2Gen's batch of 16), all visible GPUs. The engine
    follows measurements: plain PyTorch; DeepSpeed ZeRO-2 with CPU offload when model and optimizer
    states leave room for fewer than `useful_micro_batch` studies; FP8 when Transformer Engine is
    installed and a short timed run shows it faster than bf16 by `fp8_min_speedup_pct` (torchao's
    float8 is not timed: it is slower on R2Gen's small matrices). On a CPU-only machine: the tiny
    preset in fp32, which finishes in minutes. The embedded set: 3000 studies on a GPU, 1500 on a CPU.
    """
    import torch

    def run() -> None:
        options = _options(batch_size, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "auto")
        if torch.cuda.is_available():
            device, preset = "cuda", "iu_xray"
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            processes = gpus if gpus is not None else torch.cuda.device_count()
        else:
            device, preset, precision = "cpu", "tiny", "fp32"
            processes = gpus or 1
        err.print(f"auto: {device}, {precision}, {preset} preset, {processes} process(es)", highlight=False)
        overrides = dict(epochs=epochs, studies=studies, val_every=_parse_val_every(val_every), seed=seed,
                         save_every=save_every, checkpoint_every_min=checkpoint_every, test_every=test_every,
                         keep_last=keep_last,
                         **_wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name), **_speedup_overrides(speedups))
        _run_training("auto", device, precision, preset, overrides, options, ann_path, image_dir, visual_weights,
                      thresholds, run_dir, name, dry_run,
                      _topology(gpus if keep_training else processes, 1, 0, "127.0.0.1", None, keep_training),
                      keep_training=keep_training)

    _guarded(run)


@app.command("probe")
def probe_command(
    preset: ProbePreset = "iu_xray", device: Device = None, precision: Precision = None,
    backend: ProbeBackend = "plain",
    zero: Zero = 2, offload: Offload = "cpu", fp8_impl: Fp8Impl = "auto",
    batch_size: BatchSize = None, effective_batch: EffectiveBatch = None, batch_policy: BatchPolicy = None,
    lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None, max_vram: MaxVram = None,
    image_size: ImageSize = None, dataset: Dataset = None, ann_path: AnnPath = None, image_dir: ImageDir = None,
    studies: Studies = None, backbone: Backbone = None, num_workers: NumWorkers = None,
    thresholds: ThresholdsFile = None,
    json_out: JsonOut = None,
) -> None:
    """Measure GPU memory with real training steps and print the plan a training command would use.

    Real steps (forward, backward, optimizer step) in the chosen precision on reports of maximum
    length at a few micro-batch sizes; a line fitted through their peaks predicts the largest
    micro-batch under the budget, and a real step confirms it (bisecting down on out-of-memory).
    """
    import torch

    def run() -> None:
        options = _options(batch_size, True, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "throughput")
        overrides = dict(image_size=image_size, dataset=dataset, studies=studies, backbone=backbone)
        chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine = {"deepspeed": {"zero": zero, "offload": offload}, "fp8": {"fp8_impl": fp8_impl}}.get(backend, {})
        _, plan, _ = _prepare_run(backend, chosen, precision or _default_precision(backend, chosen), preset,
                                  overrides, options, ann_path, image_dir, None, thresholds, engine=engine)
        if plan.probe:
            table = Table(title=f"probe: {plan.probe['gpu']}, budget {plan.probe['budget_gib']:.1f} GiB "
                                f"(context {plan.probe['overhead_gib']:.2f} GiB)", title_justify="left")
            for column in ("micro-batch", "fits", "peak GiB"):
                table.add_column(column, justify="right")
            for micro, fits, peak in plan.probe["tried"]:
                table.add_row(str(micro), "yes" if fits else "no", "-" if peak is None else f"{peak:.2f}")
            err.print(table)
        _print_plan(plan)
        if json_out is not None:
            json_out.write_text(plan.to_json(), encoding="utf-8")

    _guarded(run)


@app.command("evaluate")
def evaluate_command(
    checkpoint: Checkpoint,
    split: Split = "test",
    beam: EvaluateBeam = None,
    device: Device = None,
    precision: EvaluatePrecision = None,
    ann_path: AnnPath = None, image_dir: ImageDir = None, num_workers: NumWorkers = None,
    out_file: EvaluateOut = None,
) -> None:
    """Metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, loss) and generated reports from a checkpoint."""

    def run() -> None:
        from r2gen.checkpoint_eval import evaluate_checkpoint
        from r2gen.metrics import METRIC_KEYS

        result = evaluate_checkpoint(checkpoint, split, beam, device, precision, ann_path, image_dir, num_workers,
                                     out_file)
        table = Table(title=f"{result.checkpoint} (step {result.step}), {split}, beam {result.beam_size}")
        for key in (*METRIC_KEYS, "loss"):
            table.add_column(key, justify="right")
        table.add_row(*(_fmt(result.scores.get(k)) for k in (*METRIC_KEYS, "loss")))
        out.print(table)
        out.print(f"{len(result.records)} reports at {result.samples_per_s:.1f} samples/s; written to "
                  f"{result.output}", highlight=False)

    _guarded(run)


@app.command("study")
def study_command(
    precisions: StudyPrecisions = "fp32,fp16,bf16,fp8",
    backend: StudyBackend = "plain",
    epochs: Epochs = None, preset: StudyPreset = None, device: Device = None, studies: Studies = None,
    ann_path: AnnPath = None, image_dir: ImageDir = None, beam_size: BeamSize = None, val_every: ValEvery = None,
    num_workers: NumWorkers = None, max_steps_per_epoch: MaxSteps = None,
    log_every: StudyLogEvery = 1,
    run_dir: RunDir = Path("runs"),
    name: StudyName = "study",
) -> None:
    """One training run per precision, each with its own probed batch; writes <run-dir>/<name>/summary.json
    and a self-contained report.html (tables, loss curves, throughput and memory charts, five test
    studies' reports side by side) and recommends a precision. Precisions this machine cannot run are
    listed as skipped with the reason. Interrupted, the same command continues it."""
    import torch

    def run() -> None:
        from launcher.environment import installed_modules, usable
        from launcher.hardware import detect
        from launcher.study import StudyRequest, parse_precisions, run_study
        from dataclasses import replace

        chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if chosen not in ("cpu", "cuda"):
            raise ConfigError(f"--device: unknown {chosen!r}; choose cpu or cuda")
        passed = [(f"--{flag.replace('_', '-')}", value) for flag, value in (
            ("epochs", epochs), ("studies", studies), ("ann_path", ann_path), ("image_dir", image_dir),
            ("beam_size", beam_size), ("val_every", val_every), ("num_workers", num_workers),
            ("max_steps_per_epoch", max_steps_per_epoch), ("log_every", log_every)) if value is not None]
        request = StudyRequest(parse_precisions(precisions), backend, run_dir / name, chosen,
                               preset or ("iu_xray" if chosen == "cuda" else "tiny"),
                               [str(x) for pair in passed for x in pair])
        facts = detect()
        verdicts = usable(facts if chosen == "cuda" else replace(facts, gpus=()), installed_modules())
        summary = run_study(request, epochs, verdicts, lambda line: err.print(line, highlight=False))
        table = Table(title=f"precision study: {summary['hardware']}, {request.preset} preset, {backend}")
        for column in ("precision", "status", "samples/s", "peak GiB", "test loss", "BLEU_4", "CIDEr", "wall s"):
            table.add_column(column, justify="right")
        for row in summary["precisions"]:
            metrics = row.get("metrics") or {}
            table.add_row(row["precision"], row["status"] if not row.get("reason") else
                          f"{row['status']}: {row['reason']}", _fmt(row.get("samples_per_s")),
                          _fmt(row.get("peak_vram_gib")), _fmt(row.get("test_loss")), _fmt(metrics.get("BLEU_4")),
                          _fmt(metrics.get("CIDEr")), "n/a" if row.get("wall_s") is None else f"{row['wall_s']:.0f}")
        out.print(table)
        out.print(f"recommended: {summary['recommended'] or 'none'} ({summary['rule']})", highlight=False)
        out.print(f"report: {request.folder / 'report.html'}; summary: {request.folder / 'summary.json'}",
                  highlight=False)

    _guarded(run)


@app.command("env")
def env_command(
    json_out: JsonOut = None,
) -> None:
    """Show this machine (GPUs, host memory, CPUs), the versions of torch, CUDA, accelerate, deepspeed,
    transformer-engine, torchao, wandb and Java, and which engines and precisions can run here."""
    from launcher.environment import installed_modules, own_version, usable, versions
    from launcher.hardware import detect

    facts = detect()
    found = {"r2gen-launch": own_version(), **versions()}
    engines = usable(facts, installed_modules())
    machine = Table(title="machine", title_justify="left")
    for column in ("what", "value"):
        machine.add_column(column)
    for gpu in facts.gpus:
        machine.add_row(f"GPU {gpu.index}", f"{gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]}, "
                                            f"{gpu.total_gib:.1f} GiB ({gpu.free_gib:.1f} free)")
    if not facts.gpus:
        machine.add_row("GPU", f"none ({facts.gpu_note})")
    h = facts.host
    machine.add_row("host", f"{h.usable_cpus} usable CPUs, {h.ram_total_gib:.1f} GiB RAM ({h.ram_available_gib:.1f} "
                            f"available), swap {h.swap_used_gib:.1f} of {h.swap_total_gib:.1f} GiB in use")
    out.print(machine)
    table = Table(title="versions", title_justify="left")
    for column in ("package", "version"):
        table.add_column(column)
    for name, version in found.items():
        table.add_row(name, version or "not installed")
    out.print(table)
    usable_table = Table(title="engines and precisions usable here", title_justify="left")
    usable_table.add_column("engine")
    for precision in ("fp32", "bf16", "fp16", "fp8"):
        usable_table.add_column(precision)
    for engine, verdicts in engines.items():
        usable_table.add_row(engine, *(verdicts.get(p, "-") for p in ("fp32", "bf16", "fp16", "fp8")))
    out.print(usable_table)
    if json_out is not None:
        from r2gen.checkpoint import write_json

        write_json(json_out, {"machine": facts.to_dict(), "versions": found, "usable": engines})


@data_app.command()
def synth(
    out_dir: SynthOut,
    studies: SynthStudies = 400,
    seed: SynthSeed = 0,
    image_size: SynthImageSize = 256,
) -> None:
    """Write the deterministic synthetic IU-X-Ray-format set (annotation.json + PNG images)."""
    from r2gen.data.synth import synthesize

    try:
        if studies < 10:
            raise ConfigError(f"--studies: at least 10 studies are needed, got {studies}")
        if image_size < 32:
            raise ConfigError(f"--image-size: must be at least 32 px, got {image_size}")
        if seed < 0:
            raise ConfigError(f"--seed: must not be negative, got {seed}")
        try:
            path = synthesize(out_dir, studies=studies, seed=seed, image_size=image_size, progress=True)
        except FileExistsError:
            raise ConfigError(f"--out: {out_dir} exists and is not empty") from None
    except UsageError as exc:
        _fail(exc)
    out.print(f"wrote {studies} studies: {path}", highlight=False)


@data_app.command("prepare")
def prepare_data(
    ann_path: PrepareAnnPath,
    out_dir: PrepareOut,
    dataset: PrepareDataset = "iu_xray",
    image_dir: ImageDir = None,
    image_size: PrepareImageSize = 224,
    workers: PrepareWorkers = None,
) -> None:
    """Decode every image once and store it at training resolution (lossless PNG): training on the
    prepared set gives the same tensors as the original files, without decoding large JPEGs per sample."""
    from r2gen.data.prepare import prepare_dataset

    try:
        path = prepare_dataset(ann_path, out_dir, image_size, dataset, image_dir, workers, progress=True)
    except UsageError as exc:
        _fail(exc)
    out.print(f"wrote the prepared set: {path} (train with --ann-path {path} --image-size {image_size})",
              highlight=False)


def _flow_help(*apps: typer.Typer) -> None:
    """Each command's help from its docstring, paragraphs joined into single lines: rich keeps a
    docstring's line breaks, and a help page wraps at the terminal's width, not the source's."""
    for group in apps:
        for info in group.registered_commands:
            doc = inspect.getdoc(info.callback) or ""
            info.help = info.help or "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


_flow_help(app, data_app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
