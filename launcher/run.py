"""A run: prepare (validate, pick the data, build the model, probe, decide `auto`, plan), start (one
process trains here; several are launched with the engine's launcher) and continue (--keep-training:
the run's own plan, re-probed). The commands in launcher/cli.py resolve their flags into one RunRequest
(launcher/request.py) and call run_training with it.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from launcher.console import describe_config, err, out, print_plan, print_result, status
from launcher.options import make_topology
from launcher.request import RunRequest
from launcher.runlock import RunLock
from r2gen.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from backends.spec import Topology
    from launcher.engine_config import EngineConfig
    from launcher.plan import Plan
    from r2gen.build import Prepared

PAPER_PRESETS = ("iu_xray", "mimic_cxr")


def default_visual_weights(preset: str, embedded: bool) -> Path | None:
    """--visual-weights when none is given: the published R2Gen's ImageNet start for the paper's presets on
    your own data (downloaded if not cached); None elsewhere (cached ImageNet weights, else random, never the
    network: the embedded set stays offline and deterministic)."""
    return Path("imagenet") if preset in PAPER_PRESETS and not embedded else None


def visual_weights_reason(given: Path | None, preset: str, embedded: bool) -> str:
    """Why the visual extractor starts where it does (the plan's row)."""
    if given is not None:
        return "--visual-weights"
    if default_visual_weights(preset, embedded) is not None:
        return "the published R2Gen starts from ImageNet: the default for the paper's presets on your own data"
    return "the embedded set and the tiny preset never use the network: cached ImageNet weights, else random"


def prepare_run(request: RunRequest) -> tuple[Prepared, Plan, Optional[Path]]:
    """Validate everything, probe, plan. Writes nothing. Returns (prepared run, plan, run directory: None
    without request.run_dir). Its topology's world size counts every process of the run (all nodes), its
    GPUs per node this machine's; request.data.init_from is a fine-tune's checkpoint (ours: a file or run
    directory; or the published R2Gen's)."""
    from backends.registry import check_engine_device
    from launcher.auto import EngineChoice, auto_engine, measured_first
    from launcher.evaluate import resolve_checkpoint
    from launcher.hardware import detect
    from launcher.plan import make_plan
    from launcher.thresholds import load_thresholds
    from r2gen.config import preset
    from r2gen.data.datasets import load_annotation
    from r2gen.data.prepare import preparation_hint, prepared_image_size
    from r2gen.data.synth import default_dataset
    from r2gen.build import prepare
    from r2gen.tensorboard_log import check_tensorboard
    from r2gen.wandb_log import check_wandb

    device, precision, data, options = request.device, request.precision, request.data, request.options
    engine, engine_options = request.engine, dict(request.engine_options)
    topology = request.topology
    world_size, gpus_here = request.world_size, topology.gpus_per_node if topology else 1
    if engine is not None:  # auto has none yet: it measures the plain engine first
        engine.engine_options(engine_options)  # --zero/--offload/--fp8-impl checked before any work
    thresholds = load_thresholds(request.thresholds)
    if engine is not None:
        check_engine_device(engine, device, world_size)
    if device == "cuda" and gpus_here > 1:
        import torch

        if torch.cuda.device_count() < gpus_here:
            raise BackendError(f"--gpus {gpus_here}: only {torch.cuda.device_count()} GPU(s) visible")
    overrides = request.overrides
    cfg = preset(request.preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    if cfg.wandb:
        check_wandb(cfg.wandb_mode)
    if cfg.tensorboard:
        check_tensorboard()
    auto = engine is None
    if auto:
        engine = measured_first()  # auto_engine may pick another engine
    backend = engine.build(device, precision, engine_options)
    options.effective_for(cfg)  # --micro-batch against the effective batch, before any work
    target = None
    if request.run_dir is not None:
        target = request.run_dir / (request.name or f"{cfg.preset}-{engine.name}-{datetime.now():%Y%m%d-%H%M%S}")
        if why := why_not_creatable(target):
            raise ConfigError(f"--run-dir/--name: cannot make the run directory {target}: {why}")
        if holds_a_run(target):
            raise ConfigError(f"--run-dir/--name: {target} already holds a run; choose another --name")
    ann_path, visual_weights = data.ann_path, data.visual_weights
    embedded = ann_path is None
    if embedded:
        if overrides.get("epochs") is None and cfg.embedded_epochs:
            cfg = cfg.replace(epochs=cfg.embedded_epochs)
        if data.image_dir is not None:
            raise ConfigError("--image-dir needs --ann-path (the embedded set has its own images)")
        err.print(f"No --ann-path: using the embedded synthetic set ({cfg.studies} studies).")
        ann_path = default_dataset(studies=cfg.studies)
    annotation = load_annotation(ann_path, data.image_dir, cfg.model.dataset, progress=True)
    prepared_for = prepared_image_size(annotation.path)
    if prepared_for is not None and prepared_for != cfg.image_size:
        err.print(f"[yellow]warning:[/] {annotation.path} was prepared for --image-size {prepared_for}, this run uses "
                  f"{cfg.image_size}: its images are resized a second time (run `data prepare` again for "
                  f"{cfg.image_size})", highlight=False)
    elif prepared_for is None and not embedded and (hint := preparation_hint(annotation, cfg.image_size)):
        err.print(f"[yellow]hint:[/] {hint}", highlight=False)
    weights_reason = visual_weights_reason(visual_weights, cfg.preset, embedded)
    if visual_weights is None and data.init_from is None:
        visual_weights = default_visual_weights(cfg.preset, embedded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start_from = resolve_checkpoint(data.init_from, "--init-from")[0] if data.init_from is not None else None
        prep = prepare(cfg, backend, annotation, visual_weights, start_from)
    cfg = prep.cfg  # a fine-tune's model is its checkpoint's
    for w in caught:
        err.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    n = {s: len(v) for s, v in annotation.splits.items()}
    err.print(f"{backend.describe()} | {cfg.preset} preset, {cfg.model.backbone} | "
              f"{n['train']}/{n['val']}/{n['test']} train/val/test studies from {annotation.path} | "
              f"vocabulary {len(prep.tokenizer)} | {sum(p.numel() for p in prep.model.parameters()):,} parameters"
              + (f" | run dir {target}" if target else ""), highlight=False)
    err.print(f"{'fine-tune' if prep.init_from is not None else 'visual extractor'}: {prep.weights_source}",
              highlight=False, soft_wrap=True)

    facts = detect()
    probe = None
    if backend.device.type == "cuda" and options.probe:
        from launcher.probe import ProbeRequest, probe_in_subprocess

        probe_request = ProbeRequest.for_run(
            facts, options, thresholds, cfg, len(prep.tokenizer), precision,
            options.probe_cap(cfg, n["train"], world_size, thresholds.min_steps_per_epoch), backend=backend.name,
            verify=options.micro_batch or 0, engine=engine_options)
        with status("probing GPU memory with real training steps..."):
            probe = probe_in_subprocess(probe_request)
    choice = None
    if auto:
        choice, probe = auto_engine(probe_request, probe, facts, thresholds) if probe else (EngineChoice(
            engine.name, precision, {}, "plain: on a CPU" if device == "cpu" else "plain: --no-probe, nothing measured"),
            probe)
        precision, engine_options = choice.precision, choice.engine
        if choice.backend != engine.name:
            engine = choice.spec
            prep.backend = engine.build(device, precision, engine_options)
        err.print(f"auto: {choice.reason}", highlight=False)
    plan = make_plan(engine, device, precision, cfg, facts, thresholds, options, sum(n.values()), probe,
                     world_size=world_size, engine=engine_options, choice=choice,
                     disk=disk_space(request.run_dir, prep) if request.run_dir is not None else None,
                     train_studies=n["train"])
    if prep.init_from is None:
        plan = dataclasses.replace(plan, visual_weights=prep.weights_source,
                                   reasons={**plan.reasons, "visual_weights": weights_reason})
    return prep, plan, target


def disk_space(run_dir: Path, prep):
    """The run directory's free space and one resumable checkpoint's size, for the plan's disk row."""
    from launcher.plan import DiskSpace
    from r2gen.checkpoint import free_bytes, model_checkpoint_bytes

    each = model_checkpoint_bytes(prep.model, prep.cfg.amsgrad, prep.backend.saves_engine)
    return DiskSpace(str(run_dir), free_bytes(run_dir), each, prep.cfg.keep_last)


@dataclass
class Ready:
    """A planned run about to go on: what it trains, its plan, its directory, its processes and engine file,
    the visual weights its workers start from (the user's flag), and the checkpoint a continued run resumes."""

    prep: Prepared
    plan: Plan
    target: Path
    topology: Topology
    engine_file: Optional[EngineConfig]
    visual_weights: Optional[Path] = None
    resume: Optional[Path] = None


def run_training(request: RunRequest) -> None:
    """A new run (or, with request.keep_training, the continued one). request.user_file: --ds-config /
    --accelerate-config, merged into the engine config the plan generates; request.data.init_from: the
    checkpoint a new run's model starts from (a fine-tune)."""
    from backends.spec import Topology
    from launcher.engine_config import engine_config_for
    from launcher.plan import apply_plan

    user_file = request.user_file
    if request.keep_training:
        if request.data.init_from is not None:
            raise ConfigError("--init-from: a continued run goes on from its own checkpoint (--keep-training); drop "
                              "--init-from, or start a new run from it without --keep-training")
        if user_file is not None:
            raise ConfigError(f"--keep-training: a continued run keeps its own engine config (in its run directory); "
                              f"drop {user_file.path}")
        continue_training(request)
        return
    request = dataclasses.replace(request, topology=request.topology or Topology())
    prep, plan, target = prepare_run(request)
    print_plan(plan)
    engine_file = engine_config_for(plan, request.topology, target, *(
        (dict(user_file.settings), user_file.path) if user_file else ()))
    prep.cfg = apply_plan(prep.cfg, plan)
    ready = Ready(prep, plan, target, request.topology, engine_file, request.data.visual_weights)
    if request.dry_run:
        start(ready, request)
        return
    with RunLock(target):
        if holds_a_run(target):  # another command started this run while we planned
            raise ConfigError(f"--run-dir/--name: {target} already holds a run; choose another --name")
        start(ready, request)


def why_not_creatable(target: Path) -> str:
    """Why the run directory `target` could not be made or written ("" where it can), found without
    writing anything: a file in the way (it, or a folder above it), or a nearest existing folder this
    process may not write into (no permission, a read-only filesystem)."""
    import os

    path = Path(target).absolute()
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        return "" if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable (permissions or a read-only filesystem)"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, where a folder of {path} should be"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable (permissions or a read-only filesystem)"
    return ""


def holds_a_run(target: Path) -> bool:
    from launcher.runlock import LOCK_NAME

    return target.is_dir() and any(p.name != LOCK_NAME for p in target.iterdir())


def write_versions(target: Path) -> None:
    """<run>/versions.json: this package, Python, torch, CUDA and the engines a run was made with."""
    import platform

    from launcher.environment import own_version, versions
    from r2gen.atomic import write_json

    write_json(target / "versions.json", {"r2gen-launch": own_version(), "python": platform.python_version(),
                                          **versions()})


def continue_training(request: RunRequest) -> None:
    """--keep-training: take the run's lock, check the run, rebuild it from its own files, re-plan the
    micro-batch, continue."""
    from launcher.resume import find_run, is_run

    target = find_run(request.run_dir, request.name)
    if request.dry_run or not is_run(target):  # writes nothing; a folder that is not a run is refused there, unlocked
        continue_locked(request, target)
        return
    with RunLock(target):  # before reading it: the run's files are ours until we exit
        continue_locked(request, target)


def continue_locked(request: RunRequest, target: Path) -> None:
    from dataclasses import replace

    from launcher.engine_config import engine_config_for, stored_engine_file
    from launcher.resume import check_request, continued_config, read_run, resume_batch
    from r2gen.data.datasets import load_annotation
    from r2gen.data.tokenizer import Tokenizer
    from r2gen.build import prepare
    from r2gen.tensorboard_log import check_tensorboard
    from r2gen.wandb_log import check_wandb

    run = read_run(target)
    overrides = dict(request.overrides)
    check_request(run, request.engine_name, request.preset_given, overrides)
    plan = run.plan
    topology = request.topology
    if topology is None:  # neither --gpus nor --nodes: as many processes as the run had, on this machine
        topology = make_topology(plan.batch.world_size, 1, 0, "127.0.0.1", None)
    if topology.world_size != plan.batch.world_size:
        raise ConfigError(f"--gpus/--nodes: {run.path} trained with {plan.batch.world_size} process(es); continue it "
                          "with as many, or leave --gpus/--nodes out (each process's share of the data depends on it)")
    for warning in run.warnings:
        err.print(f"[yellow]warning:[/] skipping {warning}", highlight=False)
    backend = plan.spec.build(plan.device, plan.precision, plan.engine)
    annotation = load_annotation(run.annotation, run.image_dir, run.cfg.model.dataset, progress=True)
    own = (run.path / "tokenizer.json").read_text(encoding="utf-8")
    with warnings.catch_warnings():  # a fine-tune's vocabulary is its start checkpoint's: kept, not rebuilt
        warnings.simplefilter("ignore")  # the visual extractor's weights come from the checkpoint
        prep = prepare(run.cfg, backend, annotation, None,
                       tokenizer=Tokenizer.from_json(own) if run.init_from else None)
    if run.init_from:
        prep.init_from, prep.weights_source = Path(run.init_from), run.weights_source  # the run's record
    if prep.tokenizer.to_json() != own:
        raise ConfigError(f"--keep-training: {run.annotation} changed since {run.path} started (its vocabulary "
                          "differs); start a new run")
    if plan.device == "cuda" and request.options.probe:
        from launcher.hardware import detect
        from launcher.probe import ProbeRequest, probe_in_subprocess
        from launcher.thresholds import load_thresholds

        window = plan.batch.micro_batch * plan.batch.accumulation  # the stored window: never probe beyond it
        probe_request = ProbeRequest.for_run(detect(), request.options, load_thresholds(request.thresholds), run.cfg,
                                             len(prep.tokenizer), plan.precision, window, backend=plan.backend,
                                             engine=plan.engine)
        with status("re-probing GPU memory..."):
            probe = probe_in_subprocess(probe_request)
        plan = replace(plan, batch=resume_batch(plan.batch, probe.micro_batch), probe=probe)
    prep.cfg = continued_config(run, overrides, plan.batch.micro_batch)
    if prep.cfg.wandb:
        check_wandb(prep.cfg.wandb_mode)
    if prep.cfg.tensorboard:
        check_tensorboard()
    print_plan(plan)
    err.print(f"continuing {run.path} from {run.checkpoint.name}", highlight=False)
    engine_file = engine_config_for(plan, topology, run.path, stored_engine_file(plan, run.path))
    start(Ready(prep, plan, run.path, topology, engine_file, resume=run.checkpoint), request)


def start(ready: Ready, request: RunRequest) -> None:
    """The one way a planned run (new, or continued from ready.resume) goes on: train in this process, or
    launch one worker per process with the engine's launcher; with request.dry_run, say which and write
    nothing."""
    from r2gen.train import train

    target, plan, resume = ready.target, ready.plan, ready.resume
    if not request.dry_run:  # every check passed: the run goes on
        write_versions(target)
    if ready.topology.world_size > 1:
        launch_processes(ready, request)
        return
    if request.dry_run:
        where = f"continuing {target} (nothing written)" if resume else f"run directory {target} (not created)"
        out.print(f"engine config: {describe_config(ready.engine_file)}\nlaunch: this process, one {plan.device} "
                  f"device; {where}", highlight=False)
        return
    start_engine(ready)
    try:
        result = train(ready.prep, target, err, plan.to_json(), resume=resume)
    finally:
        write_run_report_quietly(target)
    print_result(result)


def write_run_report_quietly(target: Path) -> None:
    """RUN/report.html at the end of every run, finished, stopped or failed; a page that cannot be drawn
    is a warning, never the run's failure."""
    from launcher.run_report import write_run_report

    try:
        err.print(f"report: {write_run_report(target)}", highlight=False)
    except Exception as exc:  # noqa: BLE001 - the run's checkpoints and metrics matter more than its page
        err.print(f"[yellow]warning:[/] {target / 'report.html'} not written: {exc}", highlight=False)


def write_engine_config(engine) -> None:
    from launcher.engine_config import write_engine_config

    if engine is not None:
        err.print(f"engine config: {write_engine_config(engine)}", highlight=False)


def start_engine(ready: Ready) -> None:
    """One process, new or continued run: write the engine's config and hand it to the engine (DeepSpeed's
    prepare() needs it; the others read nothing)."""
    write_engine_config(ready.engine_file)
    ready.plan.spec.configure(ready.prep.backend, ready.engine_file.config if ready.engine_file else None)


def launch_processes(ready: Ready, request: RunRequest) -> None:
    """Write launch.json into the run directory and start one worker per process with the engine's launcher."""
    from launcher.launch_file import Launch
    from launcher.spawn import launch_command, repo_env, run_command

    prep, plan, target, engine_file, topology = ready.prep, ready.plan, ready.target, ready.engine_file, ready.topology
    launch = target / "launch.json"
    command = launch_command(plan.spec, topology, ["--launch", str(launch)],
                             engine_config=engine_file.path if engine_file else None, hostfile=request.hostfile)
    if request.dry_run:
        out.print(f"engine config: {describe_config(engine_file)}\nlaunch: {' '.join(command)}\n"
                  f"run directory {target} (not created)", highlight=False)
        return
    spec = Launch(backend=plan.backend, device=plan.device, precision=plan.precision, engine=plan.engine,
                  engine_config=str(engine_file.path.resolve()) if engine_file else None, config=prep.cfg.to_dict(),
                  annotation=str(prep.annotation.path), image_dir=str(prep.annotation.image_dir), run_dir=str(target),
                  tokenizer=prep.tokenizer.to_json(), plan=plan.to_json(), weights_source=prep.weights_source,
                  visual_weights=str(ready.visual_weights) if ready.visual_weights else None,
                  init_from=str(prep.init_from) if prep.init_from else None,
                  resume=str(ready.resume) if ready.resume else None)
    write_engine_config(engine_file)
    spec.write(launch)
    env = repo_env()
    err.print(f"launch: {' '.join(command)}", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        code = run_command(command, env=env)
    finally:
        write_run_report_quietly(target)
    if code:
        err.print(f"[bold red]failed:[/] the {topology.world_size} training processes exited with code {code}",
                  highlight=False)
        raise typer.Exit(code)
