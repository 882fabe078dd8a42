"""The r2gen-launch CLI: complete --help, one-line errors with exit code 2, and the Quickstart path
(`auto` on the embedded set) end to end on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperCommand, TyperOption
from typer.testing import CliRunner

from launcher.cli import app
from r2gen.data.synth import DATASET_VERSION

runner = CliRunner()
COMMANDS = [["plain"], ["accelerate"], ["deepspeed"], ["fp8"], ["auto"], ["probe"], ["evaluate"], ["ce"], ["generate"], ["report"], ["study"], ["env"],
            ["data", "synth"], ["data", "prepare"], ["weights", "import"]]
GROUPS = ("data", "weights")


def _command(path: list[str]) -> TyperCommand:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command  # type: ignore[return-value]


def _options(path: list[str]) -> list[TyperOption]:
    """typer's own option objects of a command (its arguments: `_arguments`)."""
    params = _command(path).params
    assert params and all(isinstance(p, (TyperOption, TyperArgument)) for p in params), [type(p) for p in params]
    return [p for p in params if isinstance(p, TyperOption) and p.name != "help"]


def _arguments(path: list[str]) -> list[TyperArgument]:
    """A command's positional arguments (only `weights import` has one: FILE), each required, with help."""
    arguments = [p for p in _command(path).params if isinstance(p, TyperArgument)]
    assert all(p.required and p.help and p.help.strip() for p in arguments), [p.name for p in arguments]
    return arguments


def test_every_command_is_checked() -> None:
    group = typer.main.get_command(app)
    listed = {" ".join(path) for path in COMMANDS}
    found = {name for name in group.commands if name not in GROUPS}  # type: ignore[attr-defined]
    found |= {f"{g} {name}" for g in GROUPS for name in group.commands[g].commands}  # type: ignore[attr-defined]
    assert found == listed


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_option_has_help_and_shows_its_default(path: list[str]) -> None:
    ctx = _command(path).make_context(" ".join(path), [], resilient_parsing=True)
    for p in _options(path):
        assert p.help and p.help.strip(), f"{p.opts[0]}: no help text"
        # rich markup swallows a "[default: ...]" spelled in the help text: it goes in show_default.
        assert "[default" not in p.help, f"{p.opts[0]}: the default is spelled in the help text"
        # typer prints a real default, except a single flag's (--dry-run: nothing for False).
        single_flag = p.is_flag and not p.secondary_opts
        shows = p.required or isinstance(p.show_default, str) or (
            p.show_default is not False and not single_flag and p.get_default(ctx, call=False) is not None)
        assert shows, f"{p.opts[0]}: shows no default"


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_page_lists_every_option_with_its_default(path: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich's width: no default split over two lines of a cell
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    options = _options(path)
    for p in options:
        assert p.opts[0] in text, p.opts[0]
    assert text.count("[default: ") == sum(not p.required for p in options)
    assert text.count("[required]") == sum(p.required for p in options) + len(_arguments(path))
    assert _command(path).help


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_command_help_wraps_at_the_terminal_not_at_the_source(path: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = _command(path).help
    assert help_text and all("\n" not in paragraph for paragraph in help_text.split("\n\n")), help_text
    monkeypatch.setenv("COLUMNS", "250")
    page = runner.invoke(app, [*path, "--help"]).output
    last = help_text.split("\n\n")[-1]
    assert last[:200] in " ".join(page.split())  # the last paragraph is shown, joined


def test_top_level_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("plain", "auto", "data"):
        assert name in result.output


@pytest.mark.parametrize("args,needle", [
    (["plain", "--preset", "nope"], "--preset"),
    (["plain", "--device", "tpu"], "--device"),
    (["plain", "--device", "cpu", "--precision", "fp8"], "--precision"),
    (["plain", "--device", "cpu", "--val-every", "0"], "--val-every"),
    (["plain", "--device", "cpu", "--val-every", "often"], "--val-every"),
    (["plain", "--device", "cpu", "--epochs", "0"], "--epochs"),
    (["plain", "--device", "cpu", "--backbone", "vgg"], "backbone"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--image-dir", "x"], "--image-dir"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--visual-weights", "/nonexistent.pth"], "--visual-weights"),
    (["auto", "--studies", "3"], "--studies"),
    (["accelerate", "--device", "cpu", "--precision", "fp16"], "--precision fp16"),
    (["probe", "--device", "cpu", "--backend", "deepspeedy"], "--backend"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--micro-batch", "0"], "--micro-batch"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--batch-size", "64"], "--micro-batch 64 is larger"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--effective-batch", "-2"], "--effective-batch"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--target-util", "150"], "--target-util"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--max-vram", "0"], "--max-vram"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--batch-policy", "greedy"], "--batch-policy"),
    (["auto", "--lr-scaling", "cubic"], "--lr-scaling"),
    (["auto", "--num-workers", "-1"], "--num-workers"),
    (["auto", "--thresholds", "/nonexistent.yaml"], "--thresholds"),
    (["probe", "--device", "cpu", "--preset", "tiny", "--max-vram", "-4"], "--max-vram"),
    (["deepspeed", "--device", "cpu", "--preset", "tiny"], "deepspeed: needs a CUDA GPU"),
    (["fp8", "--device", "cpu", "--preset", "tiny"], "fp8: needs a CUDA GPU"),
    (["probe", "--device", "cpu", "--preset", "tiny", "--backend", "fp8"], "fp8: needs a CUDA GPU"),
    (["deepspeed", "--device", "cpu", "--zero", "3"], "--zero 3"),
    (["deepspeed", "--device", "cpu", "--offload", "nvme"], "--offload"),
    (["accelerate", "--device", "cpu", "--preset", "tiny", "--gpus", "2"], "--gpus 2: accelerate launch"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--gpus", "0"], "--gpus"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--nodes", "2", "--node-rank", "2"], "--node-rank"),
    (["plain", "--device", "cpu", "--preset", "tiny", "--master-port", "70000"], "--master-port"),
    (["data", "synth", "--out", "OUT", "--seed", "-1"], "--seed"),
    (["data", "synth", "--out", "OUT", "--studies", "5"], "--studies"),
])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    if args[0] not in ("data", "probe"):
        args += ["--run-dir", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("auto:", "No --ann"))]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_unknown_option_is_exit_2() -> None:
    assert runner.invoke(app, ["plain", "--no-such-flag"]).exit_code == 2


def test_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path), "--studies", "10"])
    assert result.exit_code == 2 and "--out" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_synth_writes_a_loadable_set(tmp_path: Path) -> None:
    from r2gen.data.datasets import load_annotation

    result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--studies", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    ann = load_annotation(tmp_path / "s" / "annotation.json")
    assert sum(len(v) for v in ann.splits.values()) == 12


def test_run_dir_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "metrics.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["plain", "--device", "cpu", "--preset", "tiny", "--run-dir", str(tmp_path / "runs"),
                                 "--name", "taken"])
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_auto_on_the_embedded_set_prints_scores_and_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             java_on_path: None) -> None:
    """The Quickstart command as written (embedded set, made in the isolated cache; the tiny preset on a
    CPU): the model it trains beats the constant report on the test split's findings F1 and BLEU-4.
    A WANDB_API_KEY in the environment reaches no file of the run and no output."""
    import torch

    secret = "wandb-test-secret-7f3a9c1e"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    on_gpu = torch.cuda.is_available()
    choice = "cuda, bf16, iu_xray" if on_gpu and torch.cuda.is_bf16_supported() else (
        "cuda, fp16, iu_xray" if on_gpu else "cpu, fp32, tiny")
    result = runner.invoke(app, ["auto", "--run-dir", str(tmp_path), "--name", "quick"], terminal_width=250)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"auto: {choice} preset" in text
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert key in text
    for row in ("val", "test", "baseline", "most frequent train report"):
        assert row in " ".join(text.split())
    config = json.loads((tmp_path / "quick" / "config.json").read_text())
    assert config["train"]["preset"] == choice.split(", ")[-1]
    final = {}
    for line in (tmp_path / "quick" / "metrics.jsonl").read_text().splitlines():
        final.update(json.loads(line))
    for score in ("findings_macro_f1", "BLEU_4"):  # the test split, the last model, against the constant report
        assert final[f"test/{score}"] > final[f"baseline_test/{score}"], (score, final[f"test/{score}"])
    from launcher.plan import Plan

    plan = Plan.from_json((tmp_path / "quick" / "plan.json").read_text())
    assert config["train"]["micro_batch"] == plan.batch.micro_batch
    assert config["train"]["window_size"] == plan.batch.micro_batch * plan.batch.accumulation
    assert f"synth-v{DATASET_VERSION}-n{config['train']['studies']}" in config["annotation"]
    assert secret not in text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_no_speedups_turns_every_step_speed_up_off_in_the_run_config(tmp_path: Path) -> None:
    from r2gen.config import STEP_SPEEDUPS

    common = ["--device", "cpu", "--preset", "tiny", "--studies", "20", "--epochs", "1", "--max-steps-per-epoch", "1",
              "--val-every", "last", "--beam-size", "1", "--run-dir", str(tmp_path)]
    for name, flags in (("on", []), ("off", ["--no-speedups"])):
        result = runner.invoke(app, ["plain", *common, "--name", name, *flags], terminal_width=250)
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / name / "config.json").read_text())["train"]
        assert [config[k] for k in STEP_SPEEDUPS] == [name == "on"] * len(STEP_SPEEDUPS)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_on_a_cpu_machine_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plain", "--device", "cuda", "--run-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--device cuda" in result.output and not (tmp_path / "runs").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plain", "--device", "cpu", "--preset", "tiny", "--studies", "20",
                                 "--effective-batch", "12", "--batch-size", "5", "--run-dir", str(tmp_path / "runs"),
                                 "--dry-run"], terminal_width=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in ("micro_batch │ 5 │ 5: --micro-batch", "accumulation │ 3", "effective_batch │ 15",
                   "engine config: none", "(not created)"):
        assert needle in text, needle
    assert not (tmp_path / "runs").exists()


def test_probe_command_on_cpu_prints_the_plan_and_writes_json(tmp_path: Path) -> None:
    from launcher.plan import Plan

    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["probe", "--device", "cpu", "--preset", "tiny", "--studies", "20",
                                 "--json", str(out)], terminal_width=250)
    assert result.exit_code == 0, result.output
    plan = Plan.from_json(out.read_text())
    assert plan.device == "cpu" and plan.probe is None and plan.batch.micro_batch == 32  # the tiny preset's batch (its window)
    assert "no GPU: nothing to measure" in " ".join(result.output.split())


def test_version_and_env_name_this_package() -> None:
    import importlib.metadata

    version = importlib.metadata.version("r2gen-launch")
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"r2gen-launch {version}"
    shown = runner.invoke(app, ["env"], terminal_width=250)
    assert shown.exit_code == 0 and "r2gen-launch" in shown.output and version in shown.output


@pytest.mark.parametrize("flag", ["--beam-size", "--beam"])
def test_evaluate_takes_beam_size_and_its_alias(tmp_path: Path, flag: str) -> None:
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path), flag, "0"])
    assert result.exit_code == 2 and "--beam-size: must be at least 1" in result.output, result.output


@pytest.mark.parametrize("overrides, own_data, epochs", [({}, False, 30), ({"epochs": 7}, False, 7), ({}, True, 100)])
def test_the_embedded_set_trains_the_presets_embedded_epochs(small_set: Path, overrides: dict, own_data: bool,
                                                             epochs: int) -> None:
    """iu_xray: 30 epochs on the embedded set (its 3000 studies are learned by then), the paper's 100 on
    the user's own data; --epochs wins either way."""
    from backends.registry import spec
    from launcher.options import plan_options
    from launcher.request import DataPaths, RunRequest
    from launcher.run import prepare_run

    options = plan_options(None, False, None, None, None, None, "sqrt", 0, "faithful")
    prep, _, _ = prepare_run(RunRequest(spec("plain"), "cpu", "fp32", "iu_xray", options, {"studies": 20, **overrides},
                                        data=DataPaths(small_set if own_data else None, None, Path("random")),
                                        run_dir=None))
    assert prep.cfg.epochs == epochs


@pytest.mark.parametrize("where", ["above", "itself"])
def test_a_run_directory_that_cannot_be_made_is_one_line_before_the_plan(tmp_path: Path, where: str) -> None:
    """A file where the run's folder (or one above it) should be: exit 2, one line naming the path and why,
    before the plan is printed and with nothing written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    args = (["--run-dir", str(blocker / "runs")] if where == "above" else ["--run-dir", str(tmp_path), "--name", "blocker"])
    result = runner.invoke(app, ["plain", "--preset", "tiny", "--device", "cpu", "--studies", "20", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "cannot make the run directory" in errors[0] and str(blocker) in errors[0] and "is a file" in errors[0]
    assert "decision" not in result.output  # no plan table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "not a folder"

