"""`r2gen-launch`: thin Typer commands. They parse, call and print; decisions live elsewhere."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from launcher import commands, console
from launcher.console import err, guarded, print_plan
from launcher.options import (AnnPath, AutoGpus, Backbone, BatchPolicy, BeamSize, CheckpointEvery, Dataset, Device,
                              DryRun, EarlyStop, EffectiveBatch, engine_parameters, Epochs, Gpus, ImageDir,
                              ImageSize, InitFrom, JsonOut, KeepLast, KeepTraining, LogEvery, LrEd, LrScaling,
                              LrVe, make_topology, MasterAddr, MasterPort, MaxSteps, MaxVram, MicroBatch, Name,
                              NodeRank, Nodes, NumWorkers, parse_val_every, plan_options, Precision,
                              Preset, Probe, ProbeBackend, probe_engine_options, ProbePreset, RunDir, SaveEvery, Seed, Seeds,
                              speedup_overrides, Speedups, Studies, TargetUtil, Tensorboard, TestEvery,
                              ThresholdsFile, ValEvery, Version, VisualWeights, Wandb, wandb_overrides, WandbMode,
                              WandbName, WandbProject)
from backends.registry import SPECS
from backends.spec import EngineSpec
from launcher.request import DataPaths
from launcher.run import prepare_run, run_training

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train R2Gen (radiology report generation) as fast as the hardware allows.")


@app.callback()
def _main_options(version: Version = False) -> None:
    """Train R2Gen (radiology report generation) as fast as the hardware allows."""


def _with_engine_flags(command, engine_params: list[inspect.Parameter], after: str | None = None) -> None:
    """`command`'s signature (without its **engine) with the engines' flags (from their specs) right after
    the `after` option, else at the end. eval_str: this module's annotations are strings (PEP 563); typer
    reads help and defaults from the Annotated objects, so the rebuilt signature must carry those."""
    params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    at = [p.name for p in params].index(after) + 1 if after else len(params)
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*params[:at], *[p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in engine_params], *params[at:]])


def _training_command(engine: EngineSpec):
    """One signature for every engine's training command (its help page is the signature), plus the
    engine's own options (declared in its spec: launcher.options.engine_parameters)."""

    def command(
        preset: Preset = None, device: Device = None, precision: Precision = None,
        epochs: Epochs = None, micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None,
        batch_policy: BatchPolicy = None, lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None,
        max_vram: MaxVram = None, probe: Probe = True, image_size: ImageSize = None, dataset: Dataset = None,
        ann_path: AnnPath = None, image_dir: ImageDir = None, studies: Studies = None, backbone: Backbone = None,
        visual_weights: VisualWeights = None, init_from: InitFrom = None, val_every: ValEvery = None,
        early_stop: EarlyStop = None,
        beam_size: BeamSize = None, lr_ve: LrVe = None, lr_ed: LrEd = None, seed: Seed = None,
        num_workers: NumWorkers = None, max_steps_per_epoch: MaxSteps = None, log_every: LogEvery = None,
        gpus: Gpus = None, nodes: Nodes = 1, node_rank: NodeRank = 0, master_addr: MasterAddr = "127.0.0.1",
        master_port: MasterPort = None, save_every: SaveEvery = None, checkpoint_every: CheckpointEvery = None,
        test_every: TestEvery = None, keep_last: KeepLast = None,
        wandb: Wandb = None, wandb_mode: WandbMode = None, wandb_project: WandbProject = None,
        wandb_name: WandbName = None, tensorboard: Tensorboard = None, keep_training: KeepTraining = False,
        thresholds: ThresholdsFile = None, run_dir: RunDir = Path("runs"), name: Name = None, dry_run: DryRun = False,
        speedups: Speedups = True, seeds: Seeds = 1,
        **engine_flags,
    ) -> None:
        def run() -> None:
            from launcher.request import training_request

            if seeds != 1:
                return commands.repeat(seeds, seed, preset, run_dir, name)

            options = plan_options(micro_batch, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                               num_workers, "faithful")
            overrides = dict(epochs=epochs, image_size=image_size, dataset=dataset,
                             studies=studies, backbone=backbone, val_every=parse_val_every(val_every),
                             early_stop=early_stop, beam_size=beam_size, lr_ve=lr_ve, lr_ed=lr_ed, seed=seed,
                             max_steps_per_epoch=max_steps_per_epoch, log_every=log_every, save_every=save_every,
                             checkpoint_every_min=checkpoint_every, test_every=test_every,
                             keep_last=keep_last, **wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name),
                             tensorboard=tensorboard, **speedup_overrides(speedups))
            run_training(training_request(
                engine, engine_flags, device=device, precision=precision, preset=preset, options=options,
                overrides=overrides, data=DataPaths(ann_path, image_dir, visual_weights, init_from),
                topology=make_topology(gpus, nodes, node_rank, master_addr, master_port, keep_training),
                thresholds=thresholds, run_dir=run_dir, name=name, dry_run=dry_run, keep_training=keep_training))

        guarded(run)

    _with_engine_flags(command, engine_parameters(engine, training=True))
    command.__doc__ = engine.summary
    return command


for _engine in SPECS.values():  # one training command per engine in the registry, its help line from its spec
    app.command(_engine.name)(_training_command(_engine))


@app.command()
def auto(
    epochs: Epochs = None, micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None,
    batch_policy: BatchPolicy = None, lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None,
    max_vram: MaxVram = None, probe: Probe = True, ann_path: AnnPath = None, image_dir: ImageDir = None,
    studies: Studies = None, visual_weights: VisualWeights = None, init_from: InitFrom = None,
    val_every: ValEvery = None,
    seed: Seed = None, num_workers: NumWorkers = None,
    gpus: AutoGpus = None,
    save_every: SaveEvery = None, checkpoint_every: CheckpointEvery = None, test_every: TestEvery = None,
    keep_last: KeepLast = None, wandb: Wandb = None, wandb_mode: WandbMode = None,
    wandb_project: WandbProject = None, wandb_name: WandbName = None, tensorboard: Tensorboard = None,
    keep_training: KeepTraining = False, thresholds: ThresholdsFile = None, run_dir: RunDir = Path("runs"),
    name: Name = None, dry_run: DryRun = False, speedups: Speedups = True, seeds: Seeds = 1,
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
    def run() -> None:
        from launcher.auto import auto_request

        if seeds != 1:
            return commands.repeat(seeds, seed, None, run_dir, name)
        options = plan_options(micro_batch, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "auto")
        overrides = dict(epochs=epochs, studies=studies, val_every=parse_val_every(val_every), seed=seed,
                         save_every=save_every, checkpoint_every_min=checkpoint_every, test_every=test_every,
                         keep_last=keep_last,
                         **wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name), tensorboard=tensorboard,
                         **speedup_overrides(speedups))
        run_training(auto_request(options, gpus, keep_training, overrides=overrides,
                                  data=DataPaths(ann_path, image_dir, visual_weights, init_from),
                                  thresholds=thresholds, run_dir=run_dir, name=name, dry_run=dry_run))

    guarded(run)


@app.command("probe")
def probe_command(
    preset: ProbePreset = "iu_xray", device: Device = None, precision: Precision = None,
    backend: ProbeBackend = "plain",
    micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None, batch_policy: BatchPolicy = None,
    lr_scaling: LrScaling = "sqrt", target_util: TargetUtil = None, max_vram: MaxVram = None,
    image_size: ImageSize = None, dataset: Dataset = None, ann_path: AnnPath = None, image_dir: ImageDir = None,
    studies: Studies = None, backbone: Backbone = None, num_workers: NumWorkers = None,
    thresholds: ThresholdsFile = None,
    json_out: JsonOut = None,
    **engine_flags,
) -> None:
    """Measure GPU memory with real training steps and print the plan a training command would use.

    Real steps (forward, backward, optimizer step) in the chosen precision on reports of maximum
    length at a few micro-batch sizes; a line fitted through their peaks predicts the largest
    micro-batch under the budget, and a real step confirms it (bisecting down on out-of-memory).
    """
    def run() -> None:
        from launcher.request import probe_request

        options = plan_options(micro_batch, True, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "throughput")
        overrides = dict(image_size=image_size, dataset=dataset, studies=studies, backbone=backbone)
        _, plan, _ = prepare_run(probe_request(backend, engine_flags, device=device, precision=precision,
                                               preset=preset, options=options, overrides=overrides,
                                               data=DataPaths(ann_path, image_dir), thresholds=thresholds))
        if plan.probe:
            console.print_probe(plan.probe)
        print_plan(plan)
        if json_out is not None:
            json_out.write_text(plan.to_json(), encoding="utf-8")

    guarded(run)


_with_engine_flags(probe_command, probe_engine_options(), after="backend")


def _flow_help(*apps: typer.Typer) -> None:
    """Each command's help from its docstring, paragraphs joined into single lines: rich keeps a
    docstring's line breaks, and a help page wraps at the terminal's width, not the source's."""
    for group in apps:
        for info in group.registered_commands:
            doc = inspect.getdoc(info.callback) or ""
            info.help = info.help or "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


commands.register(app)
_flow_help(app, *commands.GROUPS)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
