"""The commands around training: evaluate, study, env, and the `data` group. launcher/cli.py
registers them (`register`) beside the training commands; like those, they parse, call and print."""

from __future__ import annotations

from pathlib import Path

import typer

from launcher import console
from launcher.console import err, fail, guarded, out
from launcher.options import *  # noqa: F403 - every option's Annotated type, defined once
from r2gen.errors import ConfigError, UsageError

app = typer.Typer()  # collects this module's commands; register() adds them to the main app
data_app = typer.Typer(no_args_is_help=True, help="Data sets: the embedded synthetic set; a set prepared at training resolution.")
GROUPS = (data_app,)


def register(main: typer.Typer) -> None:
    main.registered_commands.extend(app.registered_commands)
    main.add_typer(data_app, name="data")


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
