"""The commands around training: evaluate, generate, report, study, env, and the `data` and `weights` groups. launcher/cli.py
registers them (`register`) beside the training commands; like those, they parse, call and print."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from launcher import console
from launcher.console import err, fail, guarded, out
from launcher.options import (AnnPath, BeamSize, CeGenerated, CeOut, CeReports, CeTruth, Checkpoint, Device,
                              Epochs, EvaluateBeam, EvaluateOut, EvaluatePrecision, GenerateAnnPath, GenerateForce,
                              GenerateImageDir, GenerateInput, GenerateOut, ImageDir, JsonOut, MaxSteps,
                              NumWorkers, PrepareAnnPath, PrepareDataset, PrepareImageSize, PrepareOut,
                              PrepareWorkers, ReportOut, ReportRun, RunDir, Split, Studies, StudyBackend,
                              StudyLogEvery, StudyName, StudyPrecisions, StudyPreset, StudySeeds, StudyTarget,
                              SynthImageSize, SynthOut, SynthSeed, SynthStudies, ValEvery, WeightsBackbone,
                              WeightsFile, WeightsForce)
from r2gen.errors import ConfigError, UsageError

app = typer.Typer()  # collects this module's commands; register() adds them to the main app
data_app = typer.Typer(no_args_is_help=True, help="Data sets: the embedded synthetic set; a set prepared at training resolution.")
weights_app = typer.Typer(no_args_is_help=True, help="Pretrained visual-extractor weights, offline: torchvision's "
                          "ImageNet ResNet files put where its cache looks.")
GROUPS = (data_app, weights_app)


def register(main: typer.Typer) -> None:
    main.registered_commands.extend(app.registered_commands)
    main.add_typer(data_app, name="data")
    main.add_typer(weights_app, name="weights")


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
    """Metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, loss) and generated reports from a checkpoint of any engine, or
    a published R2Gen one (--ann-path: the data set it was trained on)."""

    def run() -> None:
        from launcher.evaluate import evaluate_checkpoint
        result = evaluate_checkpoint(checkpoint, split, beam, device, precision, ann_path, image_dir, num_workers,
                                     out_file)
        console.print_evaluation(result, split)

    guarded(run)


@app.command("ce")
def ce_command(generated: CeGenerated, truth: CeTruth, reports: CeReports = None, out_file: CeOut = None) -> None:
    """Clinical efficacy as the published R2Gen computes it: precision, recall and F1 (macro, micro, per
    observation) and AUROC of the CheXpert labeler's observations on generated against true reports. Every
    test evaluation writes the labeler's inputs (reports/*.generated.csv, *.truth.csv); run the labeler on
    each, then this (docs/resume.md)."""

    def run() -> None:
        from r2gen.atomic import write_json
        from r2gen.clinical import check_pair, clinical_efficacy, read_labelled, read_written
        truth_file, generated_file = read_labelled(truth, "--truth"), read_labelled(generated, "--generated")
        check_pair(truth_file, generated_file, read_written(reports) if reports is not None else None)
        scores = clinical_efficacy(truth_file, generated_file)
        # Beside the evaluation it scores (a run's reports/: its report.html shows it), else beside --generated.
        output = out_file or (reports.with_name(f"ce-{reports.name}") if reports is not None else generated.with_name("ce.json"))
        write_json(output, {"generated": str(generated), "truth": str(truth), **scores})
        console.print_clinical(scores, f"clinical efficacy: {generated} against {truth}", output)
        run_dir = output.parent.parent
        if output.parent.name == "reports" and (run_dir / "config.json").is_file():
            from launcher.run_report import write_run_report
            out.print(f"run report: {write_run_report(run_dir)}", highlight=False)

    guarded(run)


@app.command("generate")
def generate_command(
    checkpoint: Checkpoint,
    input_path: GenerateInput,
    beam: EvaluateBeam = None,
    ann_path: GenerateAnnPath = None, image_dir: GenerateImageDir = None,
    device: Device = None, precision: EvaluatePrecision = None, num_workers: NumWorkers = None,
    out_dir: GenerateOut = None, force: GenerateForce = False,
) -> None:
    """Reports for new studies (a folder of images, or an annotation without reports) from a checkpoint of any
    engine or a published R2Gen one, with the evaluation's image transform and batched beam search: writes
    reports.jsonl and reports.csv (id, images, report; on the embedded synthetic set's kind of data also the
    findings each report states). Every image is checked before the model is built."""

    def run() -> None:
        from launcher.generate import generate_reports

        done = generate_reports(checkpoint, input_path, beam, ann_path, image_dir, device, precision, num_workers,
                                out_dir, force)
        out.print(f"{done.studies} reports (beam {done.beam_size}) at {done.samples_per_s:.1f} studies/s from "
                  f"{done.checkpoint}; written to {done.output}/{{reports.jsonl,reports.csv}}", highlight=False,
                  soft_wrap=True)

    guarded(run)


@app.command("report")
def report_command(run_dir: ReportRun, out_file: ReportOut = None) -> None:
    """Draw a run as one self-contained HTML page (no network): loss, val/test scores per epoch with the
    best epoch marked, throughput, data wait, GPU memory and utilization over time, the probe's fit,
    the plan with its reasons, and test studies' images beside their true and generated reports. Every
    run writes <run>/report.html at its end; this command draws one that is still going or was killed."""

    def run() -> None:
        from launcher.run_report import write_run_report

        out.print(f"wrote {write_run_report(run_dir, out_file)}", highlight=False)

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
    seeds: StudySeeds = 3,
    target: StudyTarget = 0.9,
) -> None:
    """Training runs per precision and seed, each with its own probed batch; writes
    <run-dir>/<name>/summary.json and a self-contained report.html (tables, each seed's scores as points,
    loss curves, throughput and memory charts, five test studies' reports side by side) and recommends a
    precision by the seeds' spread. Precisions this machine cannot run are listed as skipped with the
    reason. Interrupted, the same command continues it."""
    def run() -> None:
        from launcher.environment import installed_modules, usable
        from launcher.hardware import default_device, detect
        from launcher.study import StudyRequest, parse_precisions, run_study
        from dataclasses import replace

        chosen = default_device(device)
        if chosen not in ("cpu", "cuda"):
            raise ConfigError(f"--device: unknown {chosen!r}; choose cpu or cuda")
        passed = [(f"--{flag.replace('_', '-')}", value) for flag, value in (
            ("epochs", epochs), ("studies", studies), ("ann_path", ann_path), ("image_dir", image_dir),
            ("beam_size", beam_size), ("val_every", val_every), ("num_workers", num_workers),
            ("max_steps_per_epoch", max_steps_per_epoch), ("log_every", log_every)) if value is not None]
        from launcher.spread import seed_list
        from r2gen.config import preset as preset_config

        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"--target: a findings macro-F1 between 0 and 1, got {target}")
        preset_name = preset or ("iu_xray" if chosen == "cuda" else "tiny")
        request = StudyRequest(parse_precisions(precisions), backend, run_dir / name, chosen, preset_name,
                               [str(x) for pair in passed for x in pair],
                               seed_list(preset_config(preset_name).seed, seeds), target)
        facts = detect()
        verdicts = usable(facts if chosen == "cuda" else replace(facts, gpus=()), installed_modules())
        summary = run_study(request, epochs, verdicts, lambda line: err.print(line, highlight=False))
        console.print_study(summary, request, backend)

    guarded(run)


def repeat(seeds: int, seed: int | None, preset: str | None, run_dir: Path, name: str | None) -> None:
    """A training command's --seeds N: this command line once per seed (launcher.repeat), then the scores."""
    from launcher.repeat import run_seeds
    from launcher.spread import seed_list
    from r2gen.config import preset as preset_config

    first = seed if seed is not None else preset_config(preset or "iu_xray").seed  # auto's presets share it
    code, summary = run_seeds(sys.argv[1:], seed_list(first, seeds), run_dir, name,
                              lambda line: err.print(line, highlight=False))
    if code:
        raise SystemExit(code)
    console.print_seeds(summary)


@app.command("env")
def env_command(
    json_out: JsonOut = None,
) -> None:
    """Show this machine (GPUs, host memory, CPUs), the versions of torch, CUDA, accelerate, deepspeed,
    transformer-engine, torchao, wandb and Java, which engines and precisions can run here, and whether
    torchvision's cache holds ImageNet weights for the presets' backbones (`weights import` puts them there)."""
    from launcher.environment import imagenet_weights, installed_modules, own_version, usable, versions
    from launcher.hardware import detect

    facts = detect()
    found = {"r2gen-launch": own_version(), **versions()}
    engines = usable(facts, installed_modules())
    weights = imagenet_weights()
    console.print_env(facts, found, engines, weights)
    if json_out is not None:
        from r2gen.atomic import write_json

        write_json(json_out, {"machine": facts.to_dict(), "versions": found, "usable": engines,
                              "imagenet_weights": weights})


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
        try:  # synthesize checks --studies, --image-size and --seed
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


@weights_app.command("import")
def import_weights(
    file: WeightsFile,
    backbone: WeightsBackbone = None,
    force: WeightsForce = False,
) -> None:
    """Check a torchvision ResNet ImageNet state_dict key by key and shape by shape against the backbone, and put
    it where torchvision's cache looks (under the file name of torchvision's download), so that runs with that
    backbone start from it without --visual-weights. A bare state_dict is copied byte for byte. `env` shows what
    the cache holds."""

    def run() -> None:
        from launcher.weights import import_weights as install

        done = install(file, backbone, force)
        what = "wrote" if done.written else "already there (nothing written):"
        source = ("torchvision's published file" if done.published
                  else f"sha256 {done.sha256[:12]}, not torchvision's published file")
        out.print(f"{what} {done.path} ({done.backbone} ImageNet weights, {source}); runs with a {done.backbone} "
                  "visual extractor start from them without --visual-weights", highlight=False, soft_wrap=True)

    guarded(run)
