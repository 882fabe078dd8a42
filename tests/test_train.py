"""The shared loop on the tiny preset: loss falls, the run directory is complete, checkpoints are
atomic, and the plain backend's precisions run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from backends.plain import PlainBackend
from r2gen.build import build_optimizer, prepare
from r2gen.checkpoint import CheckpointStore, load_checkpoint, save_checkpoint, sha256_of
from r2gen.config import PRESETS, TrainConfig, preset
from r2gen.data.datasets import load_annotation
from r2gen.errors import BackendError, ConfigError
from r2gen.findings import FINDINGS_KEYS
from r2gen.scores import SCORE_KEYS
from r2gen.train import train


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


def _cfg(**changes) -> TrainConfig:
    base = dict(image_size=32, window_size=7, num_workers=0, log_every=1, val_every=0, beam_size=2)
    return preset("tiny").replace(**{**base, **changes})


def test_tiny_loss_falls_and_run_dir_is_complete(small_set: Path, tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    prep = prepare(_cfg(epochs=6), PlainBackend("cpu"), ann, None)
    result = train(prep, tmp_path / "run", _quiet())
    run = tmp_path / "run"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = [r["train/loss_epoch"] for r in records if "train/loss_epoch" in r]
    assert len(epoch_loss) == 6
    # Learning, not rounding: 0.435 here (0.434 in float64, so rounding moves it by ~1e-3), far inside 0.6.
    assert epoch_loss[-1] < 0.6 * epoch_loss[0], epoch_loss

    assert result.epochs_run == 6 and result.steps == 6 * 3
    # loss: teacher-forced, no dropout; findings: the synthetic set's labels read back from the reports
    assert set(result.val) == set(result.test) == {*SCORE_KEYS, *FINDINGS_KEYS, "loss"}
    assert set(result.baseline_val) == set(result.baseline_test) == {*SCORE_KEYS, *FINDINGS_KEYS}
    assert result.baseline_test["findings_macro_f1"] == 0.0  # the most frequent report is the normal one
    assert 0 < result.test["loss"] < epoch_loss[0]
    final = next(r for r in records if "test/BLEU_4" in r)
    assert final["epoch"] == 6 and final["val/BLEU_4"] == result.val["BLEU_4"]
    assert any("baseline_test/BLEU_4" in r and "baseline_val/findings_macro_f1" in r for r in records)
    assert final["test/findings_macro_f1"] == result.test["findings_macro_f1"]
    steps = [r for r in records if "train/loss" in r]
    for key in ("perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_pct", "system/cpu_pct",
                "system/process_rss_gib"):
        assert all(key in r for r in steps), key  # every logged step, with stable keys
    assert all(0 <= r["perf/data_wait_pct"] <= 100 and r["perf/tokens_per_s"] > 0 for r in steps)

    config = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(config["train"]) == prep.cfg
    for split, n in (("val", 3), ("test", 6)):
        reports = json.loads((run / "reports" / f"{split}_epoch006.json").read_text())
        assert len(reports) == n and {"id", "ground_truth", "generated"} <= set(reports[0])
    newest, warnings = CheckpointStore(run / "checkpoints").newest_intact()
    assert newest is not None and not warnings and newest.name == "step-00000018.pt"
    latest = load_checkpoint(newest)
    assert latest["epoch"] == 6 and latest["step"] == 18
    assert [e["step"] for e in CheckpointStore(run / "checkpoints").manifest()["states"]] == [12, 15, 18]  # last 3
    assert (run / "checkpoints" / "best.pt").is_file()
    best = CheckpointStore(run / "checkpoints").manifest()["best"]
    assert best["sha256"] == sha256_of(run / "checkpoints" / "best.pt") and 1 <= best["epoch"] <= 6
    model = type(prep.model)(prep.cfg.model, len(prep.tokenizer))
    model.load_state_dict(latest["model"])  # the checkpoint restores the same architecture
    assert not list(run.rglob("*.tmp"))


def test_an_epoch_whose_last_window_holds_one_study_trains_at_32_px(small_set: Path, tmp_path: Path) -> None:
    """21 train studies in windows of 4 leave one study, on which BatchNorm cannot train behind a 1x1
    ResNet map (this crashed with a ValueError); in micro-batches of 3 a window of 4 leaves one too."""
    for micro in (0, 3):
        cfg = _cfg(epochs=1, window_size=4, beam_size=1, micro_batch=micro)
        prep = prepare(cfg, PlainBackend("cpu"), load_annotation(small_set), None)
        train(prep, tmp_path / f"run{micro}", _quiet())
        records = [json.loads(line) for line in (tmp_path / f"run{micro}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]  # 4 + 4 + 4 + 4 + 5 studies


def test_val_every_evaluates_on_schedule(small_set: Path, tmp_path: Path) -> None:
    prep = prepare(_cfg(epochs=3, val_every=2, beam_size=1), PlainBackend("cpu"), load_annotation(small_set), None)
    train(prep, tmp_path / "run", _quiet())
    evaluated = sorted(p.name for p in (tmp_path / "run" / "reports").glob("val_*"))
    assert evaluated == ["val_epoch002.json", "val_epoch003.json"]  # every 2nd epoch and the last


def test_test_split_is_scored_for_the_last_and_the_best_model_or_every_n_epochs(small_set: Path,
                                                                                tmp_path: Path) -> None:
    prep = prepare(_cfg(epochs=4, val_every=1, beam_size=1, max_steps_per_epoch=1), PlainBackend("cpu"),
                   load_annotation(small_set), None)
    result = train(prep, tmp_path / "run", _quiet())
    reports = tmp_path / "run" / "reports"
    assert sorted(p.name for p in reports.glob("val_*")) == [f"val_epoch00{e}.json" for e in (1, 2, 3, 4)]
    assert sorted(p.name for p in reports.glob("test_*.json")) == ["test_epoch004.json"]  # the last model
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if result.best_epoch != 4:  # the best model's weights (best.pt) scored on test after the loop
        assert sorted(p.name for p in reports.glob("best_test_*.json")) == [f"best_test_epoch00{result.best_epoch}.json"]
        best = next(r for r in records if "best_test/BLEU_4" in r)
        assert best["best_epoch"] == result.best_epoch and best["best_test/BLEU_4"] == result.best_test["BLEU_4"]
    else:
        assert result.best_test == result.test
    prep = prepare(_cfg(epochs=4, val_every=1, test_every=2, beam_size=1, max_steps_per_epoch=1), PlainBackend("cpu"),
                   load_annotation(small_set), None)
    train(prep, tmp_path / "every2", _quiet())
    assert sorted(p.name for p in (tmp_path / "every2" / "reports").glob("test_*.json")) == [
        "test_epoch002.json", "test_epoch004.json"]


def test_resumable_states_follow_the_wall_clock_cadence_and_best_holds_weights_only(small_set: Path,
                                                                                   tmp_path: Path) -> None:
    ann = load_annotation(small_set)
    for minutes, states in ((0.0, [1, 2, 3]), (60.0, [3])):  # every epoch; or only at the end of a short run
        prep = prepare(_cfg(epochs=3, val_every=1, beam_size=1, max_steps_per_epoch=1, checkpoint_every_min=minutes),
                       PlainBackend("cpu"), ann, None)
        run = tmp_path / f"every{minutes:g}"
        train(prep, run, _quiet())
        store = CheckpointStore(run / "checkpoints")
        assert [e["step"] for e in store.manifest()["states"]] == states
        best = load_checkpoint(run / "checkpoints" / "best.pt")
        assert "optimizer" not in best and {"model", "config", "tokenizer"} <= best.keys()
        assert store.manifest()["best"]["sha256"] == sha256_of(run / "checkpoints" / "best.pt")
        resumable = load_checkpoint(run / "checkpoints" / f"step-{states[-1]:08d}.pt")
        assert resumable["optimizer"] is not None


def test_optimizer_matches_r2gen(small_set: Path) -> None:
    cfg = preset("iu_xray")
    assert (cfg.lr_ve, cfg.lr_ed, cfg.weight_decay, cfg.amsgrad) == (5e-5, 1e-4, 5e-5, True)
    assert (cfg.step_size, cfg.gamma, cfg.epochs, cfg.clip_value) == (50, 0.1, 100, 0.1)
    mimic = preset("mimic_cxr")
    assert (mimic.step_size, mimic.gamma, mimic.epochs, mimic.threshold, mimic.model.max_seq_length) == (1, 0.8, 30, 10, 100)
    prep = prepare(_cfg(), PlainBackend("cpu"), load_annotation(small_set), None)
    opt = build_optimizer(prep.model, prep.cfg)
    ve, ed = opt.param_groups
    assert sum(p.numel() for p in ve["params"]) == sum(p.numel() for p in prep.model.visual_extractor.parameters())
    assert sum(p.numel() for g in (ve, ed) for p in g["params"]) == sum(p.numel() for p in prep.model.parameters())
    assert ve["amsgrad"] and ve["weight_decay"] == prep.cfg.weight_decay


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_plain_mixed_precision_steps_on_cpu(small_set: Path, tmp_path: Path, precision: str) -> None:
    prep = prepare(_cfg(epochs=1, max_steps_per_epoch=2, beam_size=1), PlainBackend("cpu", precision),
                   load_annotation(small_set), None)
    before = {k: v.clone() for k, v in prep.model.state_dict().items() if v.is_floating_point()}
    result = train(prep, tmp_path / "run", _quiet())
    assert result.steps == 2
    after = prep.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_plain_backend_refuses_bad_settings() -> None:
    with pytest.raises(BackendError, match="--precision"):
        PlainBackend("cpu", "fp8")
    with pytest.raises(BackendError, match="--device"):
        PlainBackend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="--device cuda"):
            PlainBackend("cuda")


@pytest.mark.parametrize("changes,flag", [({"epochs": 0}, "--epochs"), ({"window_size": -1}, "--effective-batch"),
                                          ({"lr_ed": 0.0}, "--lr-ed"), ({"image_size": 16}, "--image-size"),
                                          ({"backbone": "vgg16"}, "backbone")])
def test_config_errors_name_the_flag(changes: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _cfg(**changes)


def test_presets_round_trip() -> None:
    for cfg in PRESETS.values():
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_configs_written_before_the_window_rename_still_load() -> None:
    """Earlier runs' config.json and checkpoints call the accumulation window batch_size."""
    cfg = preset("tiny").replace(window_size=24, micro_batch=8)
    old = {("batch_size" if key == "window_size" else key): value for key, value in cfg.to_dict().items()}
    assert "window_size" not in old and TrainConfig.from_dict(old) == cfg


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "latest.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temporary left behind


@pytest.mark.gpu
def test_plain_trains_on_cuda_bf16(small_set: Path, tmp_path: Path) -> None:
    prep = prepare(_cfg(epochs=2, image_size=64), PlainBackend("cuda", "bf16"), load_annotation(small_set), None)
    result = train(prep, tmp_path / "run", _quiet())
    assert result.steps == 6 and result.peak_memory_gib and result.peak_memory_gib > 0
    assert result.test["BLEU_4"] is not None


def test_micro_batch_larger_than_the_window_is_refused() -> None:
    with pytest.raises(ConfigError, match="--micro-batch: the micro-batch 33 is larger than the 32"):
        preset("tiny").replace(micro_batch=33)


@pytest.mark.parametrize("changes,studies,expected", [
    ({"window_size": 16}, 300, 60),                   # cap 64 -> 5 batches of 60: one shape for the split
    ({"window_size": 16}, 64, 64),                    # the cap exactly: one batch
    ({"window_size": 128, "micro_batch": 32}, 300, 100),  # 4 micro-batches of 32 -> cap 128 -> 3 x 100
    ({"window_size": 128}, 1000, 250),                # 4 x 128 -> EVAL_BATCH_MAX 256 -> 4 x 250
    ({"window_size": 16, "eval_batch_size": 7}, 20, 7),  # asked for: 3 batches of 7, 7, 6
    ({"window_size": 16}, 0, 1),                      # an empty split still gets a valid batch size
])
def test_generation_batches_are_balanced_up_to_four_micro_batches(changes: dict, studies: int, expected: int) -> None:
    cfg = preset("tiny").replace(**changes)
    size = cfg.eval_batch(studies)
    assert size == expected
    batches = -(-max(studies, 1) // size)
    assert batches * size - max(studies, 1) < batches  # the last batch is at most one study short per batch


def test_a_negative_eval_batch_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="--eval-batch-size"):
        preset("tiny").replace(eval_batch_size=-1)
