"""Every command-line option, defined once: flag, help text (with its unit) and the default it shows.

An option whose value is decided at run time (by the preset, the probe, the machine) shows that
rule as its default, written from the same tables the decision reads (`r2gen.config.PRESETS`,
`Thresholds`, `TrainConfig`), so the help page cannot drift from the code. Help texts never spell
`[default: ...]` themselves: rich markup would swallow it; `shown=` puts it where typer prints defaults.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from launcher.thresholds import Thresholds
from r2gen.config import PRESETS, TrainConfig
from r2gen.errors import ConfigError

_DEFAULTS = TrainConfig(preset="defaults", model=PRESETS["iu_xray"].model)
_T = Thresholds()


def _opt(help: str, *flags: str, shown: str | None = None) -> Any:
    """A typer option with its help and the default it shows: the real value, or `shown` where the
    value is decided at run time."""
    return typer.Option(*flags, help=help, show_default=shown if shown is not None else True)


def _per_preset(field: str) -> str:
    """'the preset's: iu_xray 100, mimic_cxr 30, tiny 18' for a TrainConfig field."""
    return "the preset's: " + ", ".join(f"{name} {getattr(cfg, field)}" for name, cfg in PRESETS.items())


def _per_preset_model(field: str) -> str:
    return "the preset's: " + ", ".join(f"{name} {getattr(cfg.model, field)}" for name, cfg in PRESETS.items())


def _print_version(value: bool) -> None:
    if value:
        from launcher.environment import own_version

        print(f"r2gen-launch {own_version()}")
        raise typer.Exit()


Version = Annotated[bool, typer.Option("--version", help="Print this package's version and exit.", is_eager=True,
                                       show_default="off", callback=_print_version)]


# -- what to train ------------------------------------------------------------------------------------
Preset = Annotated[Optional[str], _opt(f"Hyper-parameter preset: {', '.join(PRESETS)} (iu_xray and mimic_cxr are "
                                       "the paper's; tiny is for CPU smoke runs).", shown="iu_xray")]
StudyPreset = Annotated[Optional[str], _opt("Hyper-parameter preset of every run of the study.",
                                            shown="iu_xray on a GPU, tiny on a CPU")]
ProbePreset = Annotated[str, _opt(f"Hyper-parameter preset: {', '.join(PRESETS)}.")]
Device = Annotated[Optional[str], _opt("cpu or cuda.", shown="cuda when a GPU is visible, else cpu")]
Precision = Annotated[Optional[str], _opt(
    "fp32, or autocast bf16 / fp16 (fp16 with loss scaling); fp8 is its own command.",
    shown="plain fp32; accelerate and deepspeed bf16 on a GPU (fp16 where unsupported); accelerate fp32 on a CPU")]
Epochs = Annotated[Optional[int], _opt("Training epochs.", shown="the preset's: " + ", ".join(
    f"{n} {c.epochs}" + (f" ({c.embedded_epochs} on the embedded set)" if c.embedded_epochs else "")
    for n, c in PRESETS.items()))]
Dataset = Annotated[Optional[str], _opt("Annotation format: iu_xray (two views per study) or mimic_cxr (one).",
                                        shown=_per_preset_model("dataset"))]
AnnPath = Annotated[Optional[Path], _opt("R2Gen annotation.json of your data set.",
                                         shown="the embedded synthetic set, generated once into the cache")]
ImageDir = Annotated[Optional[Path], _opt("Folder the annotation's image paths are relative to.",
                                          shown="images/ beside the annotation")]
Studies = Annotated[Optional[int], _opt("Studies in the embedded synthetic set (used when no --ann-path is given).",
                                        shown=_per_preset("studies"))]
ImageSize = Annotated[Optional[int], _opt("Training image side, px.", shown=_per_preset("image_size"))]
Backbone = Annotated[Optional[str], _opt("Visual extractor: resnet18, resnet34, resnet50 or resnet101 (R2Gen's).",
                                         shown=_per_preset_model("backbone"))]
InitFrom = Annotated[Optional[Path], _opt(
    "Fine-tune: a new run whose model (shape, every weight, vocabulary) starts from this checkpoint: one of ours "
    "(a checkpoint file, step folder or run directory) or a published R2Gen one (model_iu_xray.pth; its vocabulary "
    "rebuilt from the run's annotation by R2Gen's rule and checked against it). The preset sets the training.",
    "--init-from", shown="none: a new model")]
VisualWeights = Annotated[Optional[Path], _opt(
    "The visual extractor's start: imagenet (torchvision's cache, else downloaded into it, as the published R2Gen "
    "starts; $R2GEN_IMAGENET_URL names a mirror), random (from scratch, on purpose), or a torchvision ResNet "
    "state_dict file (.pth).", shown="imagenet for the iu_xray and mimic_cxr presets on your own data; on the "
    "embedded set and the tiny preset the cached ImageNet weights if present, else random, never the network")]

# -- batch and memory ---------------------------------------------------------------------------------
MicroBatch = Annotated[Optional[int], _opt(
    "Micro-batch, studies per forward/backward on one process. Given, the probe only verifies it with one real step "
    "(--batch-size is the same).", "--micro-batch", "--batch-size",
    shown="probed on a GPU; the effective batch on a CPU")]
EffectiveBatch = Annotated[Optional[int], _opt(
    "Studies per optimizer step, all processes together; accumulation = ceil(N / (micro-batch x processes)).",
    shown=_per_preset("window_size") + " (R2Gen's 16)")]
BatchPolicy = Annotated[Optional[str], _opt(
    "faithful: keep the effective batch (and the learning rates); throughput: grow it to the largest micro-batch "
    "that fits and scale the learning rates (warmed up over one epoch); auto: throughput while an epoch keeps "
    f"{_T.min_steps_per_epoch} optimizer steps (thresholds: min_steps_per_epoch), else faithful.",
    shown="faithful; auto: auto; probe: throughput")]
LrScaling = Annotated[str, _opt("How learning rates follow a changed effective batch: linear, sqrt (suits Adam) "
                                "or none.")]
TargetUtil = Annotated[Optional[float], _opt("Share of the GPU's memory the plan may fill, %.",
                                             shown=f"{_T.target_util_pct:g}, or the --thresholds file's")]
MaxVram = Annotated[Optional[float], _opt("Hard cap on this run's GPU memory, GiB: for shared GPUs, or to reproduce "
                                          "a smaller card. The probe and training both respect it.", shown="none")]
Probe = Annotated[bool, _opt("Measure GPU memory with real steps before training (skipped on a CPU).",
                             "--probe/--no-probe")]
NumWorkers = Annotated[Optional[int], _opt("Data-loader worker processes.",
                                           shown="from usable CPUs and available RAM (--thresholds)")]
ThresholdsFile = Annotated[Optional[Path], _opt("YAML file overriding the host/VRAM thresholds (docs/planning.md: host thresholds).",
                                                "--thresholds", shown="the built-in table")]

# -- schedule, evaluation, optimisation ---------------------------------------------------------------
ValEvery = Annotated[Optional[str], _opt("Evaluate val every N epochs (the best val model is kept; the test split: "
                                         "--test-every), or 'last' for only after the final epoch.", shown="the preset's: " + ", ".join(
                                             f"{n} {c.val_every or 'last'}" for n, c in PRESETS.items()))]
EarlyStop = Annotated[Optional[int], _opt("Stop after this many epochs without val BLEU_4 improvement.",
                                          shown=_per_preset("early_stop"))]
BeamSize = Annotated[Optional[int], _opt("Beam size for generation; 1 is greedy with trigram blocking.",
                                         "--beam-size", shown=_per_preset("beam_size"))]
EvaluateBeam = Annotated[Optional[int], _opt("Beam size for generation; 1 is greedy with trigram blocking "
                                             "(--beam is the same).", "--beam-size", "--beam",
                                             shown="the run's own")]
LrVe = Annotated[Optional[float], _opt("Visual extractor learning rate.", shown=_per_preset("lr_ve"))]
LrEd = Annotated[Optional[float], _opt("Encoder-decoder learning rate.", shown=_per_preset("lr_ed"))]
Seed = Annotated[Optional[int], _opt("Random seed.", shown=_per_preset("seed"))]
Seeds = Annotated[int, _opt("Train N times, with seeds --seed (else the preset's), +1, ..., one run after another in "
                            "<name>-s<seed>; then every test score over them (mean ± standard deviation, the runs) "
                            "in <run-dir>/<name>-seeds.json. Given again, finished seeds are kept.")]
MaxSteps = Annotated[Optional[int], _opt("Cut each epoch after this many optimizer steps; 0: the whole epoch.",
                                         shown=str(_DEFAULTS.max_steps_per_epoch))]
LogEvery = Annotated[Optional[int], _opt("Optimizer steps between metrics.jsonl records.",
                                         shown=str(_DEFAULTS.log_every))]
Speedups = Annotated[bool, _opt(
    "The training step's GPU speed-ups: channels_last and cuDNN autotuning for the ResNet, fused Adam, the fused "
    "relational memory (Triton), CUDA graphs of the encoder-decoder (the same function; docs/speed.md). --no-speedups: the plain step. On a CPU only the "
    "fused Adam applies.", "--speedups/--no-speedups")]

# -- processes ----------------------------------------------------------------------------------------
Gpus = Annotated[Optional[int], _opt(
    "Processes on this machine, one per GPU, started by the engine's launcher (plain/fp8: torchrun, "
    "gradients averaged once per window; accelerate: accelerate launch; deepspeed: the deepspeed launcher). On a CPU-only "
    "machine (plain), that many gloo processes.", shown="1; with --keep-training, as many as the run had")]
AutoGpus = Annotated[Optional[int], _opt("GPUs on this machine, one process each.", shown="all visible")]
Nodes = Annotated[int, _opt("Machines taking part; run the same command on each with its --node-rank.")]
NodeRank = Annotated[int, _opt("This machine's rank among --nodes (0 hosts the rendezvous).")]
MasterAddr = Annotated[str, _opt("Address of node 0, reachable from every node.")]
MasterPort = Annotated[Optional[int], _opt("Rendezvous TCP port on node 0.",
                                           shown="a free port on one machine, 29500 with --nodes > 1")]
# -- engines: each engine declares its own options (typed, with help) in its spec; engine_parameters below
ProbeBackend = Annotated[str, _opt("Adapter the run will train with: plain, accelerate, deepspeed or fp8.")]

# -- runs, checkpoints, logging -----------------------------------------------------------------------
RunDir = Annotated[Path, _opt("Parent folder of run directories.")]
Name = Annotated[Optional[str], _opt("Run name: the run directory inside --run-dir.",
                                     shown="<preset>-<engine>-<time>; with --keep-training, the newest run")]
KeepTraining = Annotated[bool, _opt(
    "Continue the run --run-dir/--name (without --name: the newest run in --run-dir) from its newest intact "
    "checkpoint, exactly where it stopped: weights, optimizer, schedule, random state, data order. The run's own "
    "settings apply; only --epochs, --val-every, --early-stop, --beam-size, --log-every, --max-steps-per-epoch, "
    "--save-every, --keep-last, --no-speedups, --tensorboard and the --wandb options may change.", "--keep-training",
    shown="off: a new run")]
SaveEvery = Annotated[Optional[int], _opt("Optimizer steps between resumable checkpoints; 0: at epoch ends only.",
                                          shown=str(_DEFAULTS.save_every))]
CheckpointEvery = Annotated[Optional[float], _opt(
    "Wall minutes between resumable checkpoints, written at the first epoch end after that long (and always at the "
    "end, before an early stop and on SIGTERM/Ctrl-C); 0: at every epoch end. best.pt (weights only) follows every "
    "val improvement.", shown=_per_preset("checkpoint_every_min"))]
TestEvery = Annotated[Optional[int], _opt(
    "Also evaluate the test split every N epochs; 0: only the best model (by val BLEU-4) and the last one.",
    shown=str(_DEFAULTS.test_every))]
KeepLast = Annotated[Optional[int], _opt("Resumable checkpoints kept, the newest ones.",
                                         shown=str(_DEFAULTS.keep_last))]
DryRun = Annotated[bool, _opt("Print the plan, engine config and launch command, then stop (nothing is written).",
                              "--dry-run", shown="off")]
Wandb = Annotated[Optional[bool], _opt("Also log every metrics.jsonl record and the plan (as config) to Weights & "
                                       "Biases.", "--wandb/--no-wandb", shown="off")]
WandbMode = Annotated[Optional[str], _opt("offline: W&B files under <run>/wandb, `wandb sync` uploads them later; "
                                          "online: needs WANDB_API_KEY in the environment.",
                                          shown=_DEFAULTS.wandb_mode)]
WandbProject = Annotated[Optional[str], _opt("W&B project.", shown=_DEFAULTS.wandb_project)]
WandbName = Annotated[Optional[str], _opt("W&B run name.", shown="the run directory's name")]
Tensorboard = Annotated[Optional[bool], _opt(
    "Also write every metrics.jsonl record as TensorBoard scalars (and the plan as text) to <run>/tb; view with "
    "`tensorboard --logdir <run>/tb`. Needs the tensorboard package.", "--tensorboard/--no-tensorboard", shown="off")]
JsonOut = Annotated[Optional[Path], _opt("Also write what is shown to this JSON file.", "--json", shown="none")]

# -- evaluate -----------------------------------------------------------------------------------------
Checkpoint = Annotated[Path, _opt("A checkpoint of any engine: step-N.pt, best.pt, a step-N/ folder (DeepSpeed, "
                                  "Accelerate), or a run directory (its best.pt, else its newest intact state); or "
                                  "a published R2Gen checkpoint (model_iu_xray.pth, model_mimic_cxr.pth), with "
                                  "--ann-path naming the data set it was trained on.")]
Split = Annotated[str, _opt("train, val or test.")]
EvaluatePrecision = Annotated[Optional[str], _opt("fp32, bf16 or fp16 autocast for generation.",
                                                  shown="bf16 on a GPU, fp32 on a CPU")]
EvaluateOut = Annotated[Optional[Path], _opt("Where the scores and reports go (JSON).", "--out",
                                             shown="<run>/reports/evaluate-<split>-<checkpoint>-beam<N>.json")]

# -- ce -----------------------------------------------------------------------------------------------
CeGenerated = Annotated[Path, _opt("The CheXpert labeler's output for the generated reports (res_labeled.csv: a "
                                   "Reports column, then one column per observation).")]
CeTruth = Annotated[Path, _opt("The CheXpert labeler's output for the true reports (gts_labeled.csv), the same "
                               "studies in the same order.")]
CeReports = Annotated[Optional[Path], _opt("The evaluation's JSON the labeler's inputs were written from "
                                           "(reports/test_epochNNN.json or evaluate's --out): each labelled report "
                                           "is checked against it, so a file of another order is refused.",
                                           shown="no check of the order")]
CeOut = Annotated[Optional[Path], _opt("Where the scores go (JSON).", "--out",
                                       shown="ce-<reports>.json beside --reports (a run's report.html then shows "
                                             "them), else ce.json beside --generated")]

# -- generate -----------------------------------------------------------------------------------------
GenerateInput = Annotated[Path, _opt(
    "The new studies: a folder (IU X-Ray: a sub-folder per study holding its two views, taken in file-name order, "
    "frontal first; MIMIC-CXR: one image per study, as a file in the folder or a sub-folder holding it; the "
    "folder's or file's name is the study id), or an annotation.json in R2Gen's shape whose reports are empty or "
    "absent.", "--input")]
GenerateAnnPath = Annotated[Optional[Path], _opt(
    "A published R2Gen checkpoint's data set: its annotation.json (images not needed). The vocabulary is rebuilt "
    "from its train reports by R2Gen's rule and checked against the checkpoint; one image per study means "
    "MIMIC-CXR, else IU X-Ray.", shown="none: our checkpoints carry their vocabulary")]
GenerateImageDir = Annotated[Optional[Path], _opt("Folder the --input annotation's image paths are relative to.",
                                                  shown="images/ beside the --input annotation")]
GenerateOut = Annotated[Optional[Path], _opt("Folder for reports.jsonl and reports.csv.", "--out",
                                             shown="<run>/reports/generate-<input>-<checkpoint>-beam<N>/")]
GenerateForce = Annotated[bool, _opt("Replace the reports already in --out.", "--force", shown="off: refused")]

# -- report -------------------------------------------------------------------------------------------
ReportRun = Annotated[Path, typer.Argument(help="A run directory (finished, still going, or killed).", metavar="RUN",
                                           show_default=False)]
ReportOut = Annotated[Optional[Path], _opt("Where the page goes.", "--out", shown="<run>/report.html")]

# -- study --------------------------------------------------------------------------------------------
StudyPrecisions = Annotated[str, _opt("Comma-separated precisions to compare: fp32, fp16, bf16, fp8 (fp8 runs the "
                                      "fp8 engine).")]
StudyBackend = Annotated[str, _opt("Engine for fp32/fp16/bf16: plain, accelerate or deepspeed.")]
StudyLogEvery = Annotated[int, _opt("Optimizer steps between logged records (the loss curves' resolution).")]
StudyName = Annotated[str, _opt("The study's folder under --run-dir (run again to continue it).")]
StudySeeds = Annotated[int, _opt("Runs per precision, with seeds the preset's, +1, ...: every figure is reported over "
                                 "them (mean ± standard deviation, the runs) and quality compared by their spread.")]
StudyTarget = Annotated[float, _opt("Val findings macro-F1 whose first crossing times each run (time to target).")]

# -- data ---------------------------------------------------------------------------------------------
SynthOut = Annotated[Path, _opt("Folder to create (must not exist or be empty).", "--out")]
SynthStudies = Annotated[int, _opt("Number of studies (two views each); split ~70/10/20.")]
SynthSeed = Annotated[int, _opt("Random seed; the same seed gives byte-identical files.")]
SynthImageSize = Annotated[int, _opt("Image side, px.")]
PrepareAnnPath = Annotated[Path, _opt("The data set's annotation.json (R2Gen's format).")]
PrepareOut = Annotated[Path, _opt("Folder to create for the prepared set (must not exist or be empty).", "--out")]
PrepareDataset = Annotated[str, _opt("iu_xray (two views per study) or mimic_cxr (one).")]
PrepareImageSize = Annotated[int, _opt("The training --image-size, px: train images get R2Gen's "
                                       "Resize(size*256/224), val/test images Resize(size, size).")]
PrepareWorkers = Annotated[Optional[int], _opt("Decoding processes.", shown="the usable CPUs, at most 16")]

# -- weights ------------------------------------------------------------------------------------------
WeightsFile = Annotated[Path, typer.Argument(
    help="A torchvision ResNet state_dict (.pth), fc included: bare, or under \"state_dict\" or \"model\"; read "
         "weights-only, so it never runs code.", metavar="FILE", show_default=False)]
WeightsBackbone = Annotated[Optional[str], _opt("The file's ResNet: resnet18, resnet34, resnet50 or resnet101 "
                                                "(R2Gen's); the file is checked against it.", "--backbone",
                                                shown="the one whose keys the file has")]
WeightsForce = Annotated[bool, _opt("Replace other weights already in torchvision's cache under that name.",
                                    "--force", shown="off")]


# From the options to what the run needs

def parse_val_every(value: Optional[str]) -> Optional[int]:
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


def plan_options(micro_batch, probe, target_util, max_vram, effective_batch, batch_policy, lr_scaling, num_workers,
                 default_policy: str):
    from launcher.plan import PlanOptions

    return PlanOptions(micro_batch=micro_batch, probe=probe, target_util_pct=target_util, max_vram_gib=max_vram,
                       effective_batch=effective_batch, batch_policy=batch_policy or default_policy,
                       lr_scaling=lr_scaling, num_workers=num_workers)


def engine_parameters(engine, training: bool) -> list[inspect.Parameter]:
    """An engine's own flags, from its spec (backends/<engine>.py): its typed options' fields with their
    help, then (`training`) its config file's flag and its launcher's flags. Where the engine reads a
    file, a training command's option stays None unless given (the user's file may set it)."""
    import dataclasses
    import typing

    params = []
    hints = typing.get_type_hints(engine.options) if engine.options is not None else {}
    for f in dataclasses.fields(engine.options) if engine.options is not None else ():
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if training and engine.file is not None:
            annotation = Annotated[Optional[hints[f.name]], _opt(help_text, flag,
                                                                 shown=f"{f.default}, or {engine.file.flag}'s")]
            params.append(_keyword(f.name, None, annotation))
        else:
            params.append(_keyword(f.name, f.default, Annotated[hints[f.name], _opt(help_text, flag)]))
    if training and engine.file is not None:
        params.append(_keyword(engine.file.option, None, Annotated[Optional[Path], _opt(
            engine.file.help, engine.file.flag, shown="generated from the plan")]))
    for launch in engine.launch_options if training else ():
        params.append(_keyword(launch.name, None, Annotated[Optional[Path], _opt(launch.help, shown=launch.shown)]))
    return params


def _keyword(name: str, default, annotation) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def probe_engine_options() -> list[inspect.Parameter]:
    """`probe`'s engine flags: every engine's options with their defaults, once each, in registry order."""
    from backends.registry import SPECS

    seen: dict[str, inspect.Parameter] = {}
    for engine in SPECS.values():
        for param in engine_parameters(engine, training=False):
            seen.setdefault(param.name, param)
    return list(seen.values())


def wandb_overrides(wandb: Optional[bool], mode: Optional[str], project: Optional[str],
                    name: Optional[str]) -> dict:
    """The --wandb options as config overrides; a W&B detail without --wandb is a mistake worth a line."""
    if wandb is False or (wandb is None and (mode or project or name)):
        given = [flag for flag, value in (("--wandb-mode", mode), ("--wandb-project", project),
                                          ("--wandb-name", name)) if value]
        if given:
            raise ConfigError(f"{given[0]}: needs --wandb")
    return dict(wandb=wandb, wandb_mode=mode, wandb_project=project, wandb_name=name)


def make_topology(gpus: Optional[int], nodes: int, node_rank: int, master_addr: str, master_port: Optional[int],
                  keep_training: bool = False):
    """The processes asked for; None where --keep-training should take the continued run's own
    (neither --gpus nor --nodes given)."""
    from backends.spec import Topology
    from launcher.spawn import free_port

    if gpus is None and nodes == 1 and keep_training:
        return None
    if master_port is None:
        master_port = free_port() if nodes == 1 else 29500
    return Topology(gpus_per_node=1 if gpus is None else gpus, nodes=nodes, node_rank=node_rank,
                    master_addr=master_addr, master_port=master_port)


def speedup_overrides(speedups: bool) -> dict:
    """--no-speedups as config overrides (--speedups keeps the configuration's own, on by default)."""
    from r2gen.config import STEP_SPEEDUPS

    return {} if speedups else {name: False for name in STEP_SPEEDUPS}
