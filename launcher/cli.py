"""`r2gen-launch`: thin Typer commands. They parse, call and print; decisions live elsewhere."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from launcher import console
from launcher.console import err, fail, guarded, out, print_plan
from launcher.options import *  # noqa: F403 - every option's Annotated type, defined once
from launcher.options import (ENGINE_OPTIONS, make_topology, parse_val_every, plan_options, speedup_overrides,
                              wandb_overrides)
from launcher.run import default_precision, prepare_run, run_training, user_engine_file
from r2gen.errors import ConfigError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train R2Gen (radiology report generation) as fast as the hardware allows.")
data_app = typer.Typer(no_args_is_help=True, help="Data sets: the embedded synthetic set; a set prepared at training resolution.")
app.add_typer(data_app, name="data")


@app.callback()
def _main_options(version: Version = False) -> None:
    """Train R2Gen (radiology report generation) as fast as the hardware allows."""


def _training_command(backend_name: str, summary: str):
    """One signature for every engine's training command (its help page is the signature), plus the
    engine's own options (ENGINE_OPTIONS)."""

    def command(
        preset: Preset = None, device: Device = None, precision: Precision = None,
        epochs: Epochs = None, micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None,
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
            from backends.registry import spec

            options = plan_options(micro_batch, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                               num_workers, "faithful")
            overrides = dict(epochs=epochs, image_size=image_size, dataset=dataset,
                             studies=studies, backbone=backbone, val_every=parse_val_every(val_every),
                             early_stop=early_stop, beam_size=beam_size, lr_ve=lr_ve, lr_ed=lr_ed, seed=seed,
                             max_steps_per_epoch=max_steps_per_epoch, log_every=log_every, save_every=save_every,
                             checkpoint_every_min=checkpoint_every, test_every=test_every,
                             keep_last=keep_last, **wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name),
                             **speedup_overrides(speedups))
            chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
            hostfile = engine.pop("hostfile", None)
            user_file = user_engine_file(engine)
            file_choices = user_file[2]
            defaults = spec(backend_name).option_defaults
            for key in engine.keys() & defaults.keys():  # a flag, else the user's file, else the engine's default
                if engine[key] is None:
                    engine[key] = file_choices.get(key, defaults[key])
            run_training(backend_name, chosen,
                         precision or file_choices.get("precision") or default_precision(backend_name, chosen),
                         preset or "iu_xray", overrides, options, ann_path, image_dir, visual_weights, thresholds,
                         run_dir, name, dry_run, make_topology(gpus, nodes, node_rank, master_addr, master_port,
                                                           keep_training), engine, hostfile, keep_training, preset,
                         user_file[:2])

        guarded(run)

    # eval_str: this module's annotations are strings (PEP 563); typer reads help and defaults from the
    # Annotated objects, so the rebuilt signature must carry those, not their names.
    params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*params, *ENGINE_OPTIONS.get(backend_name, [])])  # type: ignore[attr-defined]
    command.__doc__ = summary
    return command


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
    epochs: Epochs = None, micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None,
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
        options = plan_options(micro_batch, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "auto")
        if torch.cuda.is_available():
            device, preset = "cuda", "iu_xray"
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            processes = gpus if gpus is not None else torch.cuda.device_count()
        else:
            device, preset, precision = "cpu", "tiny", "fp32"
            processes = gpus or 1
        err.print(f"auto: {device}, {precision}, {preset} preset, {processes} process(es)", highlight=False)
        overrides = dict(epochs=epochs, studies=studies, val_every=parse_val_every(val_every), seed=seed,
                         save_every=save_every, checkpoint_every_min=checkpoint_every, test_every=test_every,
                         keep_last=keep_last,
                         **wandb_overrides(wandb, wandb_mode, wandb_project, wandb_name), **speedup_overrides(speedups))
        run_training("auto", device, precision, preset, overrides, options, ann_path, image_dir, visual_weights,
                     thresholds, run_dir, name, dry_run,
                     make_topology(gpus if keep_training else processes, 1, 0, "127.0.0.1", None, keep_training),
                     keep_training=keep_training)

    guarded(run)


@app.command("probe")
def probe_command(
    preset: ProbePreset = "iu_xray", device: Device = None, precision: Precision = None,
    backend: ProbeBackend = "plain",
    zero: Zero = 2, offload: Offload = "cpu", fp8_impl: Fp8Impl = "auto",
    micro_batch: MicroBatch = None, effective_batch: EffectiveBatch = None, batch_policy: BatchPolicy = None,
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
        options = plan_options(micro_batch, True, target_util, max_vram, effective_batch, batch_policy, lr_scaling,
                           num_workers, "throughput")
        overrides = dict(image_size=image_size, dataset=dataset, studies=studies, backbone=backbone)
        chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
        from backends.registry import spec

        given = {"zero": zero, "offload": offload, "fp8_impl": fp8_impl}
        engine = spec(backend).engine_options({k: v for k, v in given.items() if k in spec(backend).option_defaults})
        _, plan, _ = prepare_run(backend, chosen, precision or default_precision(backend, chosen), preset,
                                 overrides, options, ann_path, image_dir, None, thresholds, engine=engine)
        if plan.probe:
            console.print_probe(plan.probe)
        print_plan(plan)
        if json_out is not None:
            json_out.write_text(plan.to_json(), encoding="utf-8")

    guarded(run)


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
        from launcher.evaluate import evaluate_checkpoint
        result = evaluate_checkpoint(checkpoint, split, beam, device, precision, ann_path, image_dir, num_workers,
                                     out_file)
        console.print_evaluation(result, split)

    guarded(run)


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
        console.print_study(summary, request, backend)

    guarded(run)


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
    console.print_env(facts, found, engines)
    if json_out is not None:
        from r2gen.atomic import write_json

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
        fail(exc)
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
        fail(exc)
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
