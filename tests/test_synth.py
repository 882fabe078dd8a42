"""Tests for r2gen.data.synth (with synth_reports and synth_images), the embedded synthetic IU-X-Ray-format data set.

CPU only and fast (the whole file runs in well under 30 s): sets are generated at
32-64 px, which is also where the findings are hardest to see.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r2gen.data import synth
from r2gen.data.synth import DATASET_VERSION, default_dataset, plan_studies, synthesize
from r2gen.data.synth_images import render_frontal, render_lateral
from r2gen.data.synth_reports import PRIORS, Findings, report_vocabulary, sample_findings, write_report
from r2gen.errors import ConfigError

FINDING_NAMES = ("heart", "effusion", "opacity", "pneumothorax", "device")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _words(report: str) -> list[str]:
    return [w.strip(".").lower() for w in report.split()]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("small") / "set", studies=40, seed=3, image_size=48)


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~1 s to generate: 300 studies at 64 px.
    return synthesize(tmp_path_factory.mktemp("learn") / "set", studies=300, seed=0, image_size=64)


# ----------------------------------------------------------------------------- format


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", studies=12, seed=7, image_size=40).parent
    b = synthesize(tmp_path / "b", studies=12, seed=7, image_size=40).parent
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) == 1 + 2 * 12
    assert files_a == files_b
    # ... and the seed matters.
    c = synthesize(tmp_path / "c", studies=12, seed=8, image_size=40).parent
    assert _files(c)["annotation.json"] != files_a["annotation.json"]


def test_the_set_is_the_one_published_before_the_split_into_modules(tmp_path: Path) -> None:
    """r2gen.data.synth was split into reports, images and publishing (2026-12-07) without changing a
    byte: annotation.json (reports, findings, splits: pure integer and string work, the same on any
    CPU) has the digest it had before. The images matched too on the machine that split it (their
    float rendering may round differently on other CPUs' vector maths, so only determinism is
    asserted for them, above)."""
    import hashlib

    for (studies, seed, size), digest in (
            ((40, 3, 64), "6394c74780d82cda986a59a26d4a18bf165c2a9e3b553beb18f592bc22079938"),
            ((12, 0, 256), "de92716a417a540de62a65402fa919ec760250d6bf909388df3bcffcb41d3c28")):
        path = synthesize(tmp_path / f"s{studies}", studies=studies, seed=seed, image_size=size)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_annotation_does_not_depend_on_image_size(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", studies=10, seed=1, image_size=32)
    b = synthesize(tmp_path / "b", studies=10, seed=1, image_size=64)
    assert a.read_bytes() == b.read_bytes()


def test_annotation_format_and_splits(small_set: Path) -> None:
    ann = json.loads(small_set.read_text())
    assert list(ann) == ["train", "val", "test"]
    assert {k: len(v) for k, v in ann.items()} == {"train": 28, "val": 4, "test": 8}
    ids = [e["id"] for split in ann.values() for e in split]
    assert sorted(ids) == [f"synth_{i:05d}" for i in range(40)]
    for split, entries in ann.items():
        for e in entries:
            assert set(e) == {"id", "report", "image_path", "split", "findings"}
            assert e["split"] == split
            assert e["image_path"] == [f"{e['id']}/0.png", f"{e['id']}/1.png"]
            assert set(e["findings"]) == set(FINDING_NAMES)
            assert e == {**e, "findings": Findings(**e["findings"]).as_dict()}


@pytest.mark.parametrize("studies", [10, 11, 13, 19, 57, 100, 400, 2955])
def test_split_sizes(studies: int) -> None:
    counts = collections.Counter(synth._split_of(studies, seed=0))
    assert all(counts[s] >= 1 for s in ("train", "val", "test"))
    assert counts["train"] > counts["test"] > 0
    for split, frac in zip(("train", "val", "test"), synth.SPLIT_FRACTIONS):
        assert abs(counts[split] - frac * studies) <= 1.0
    assert synth._split_of(studies, seed=0) == synth._split_of(studies, seed=0)


def test_too_few_studies_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--studies"):
        synthesize(tmp_path / "x", studies=9)
    with pytest.raises(ConfigError, match="--studies"):
        default_dataset(studies=5, cache_dir=tmp_path)
    assert not (tmp_path / "x").exists()


def test_images_are_8bit_grayscale_two_views(small_set: Path) -> None:
    ann = json.loads(small_set.read_text())
    images = small_set.parent / "images"
    entries = [e for split in ann.values() for e in split]
    assert sorted(p.name for p in images.iterdir()) == sorted(e["id"] for e in entries)
    for e in entries:
        assert sorted(p.name for p in (images / e["id"]).iterdir()) == ["0.png", "1.png"]
        for rel in e["image_path"]:
            with Image.open(images / rel) as im:
                assert im.format == "PNG" and im.mode == "L" and im.size == (48, 48)
                im.verify()
    # The hand-written PNG encoder round-trips the rendered pixels exactly.
    first = min(entries, key=lambda e: e["id"])
    rng = np.random.default_rng([3, 0, 1])
    f = Findings(**first["findings"])
    for view, render in enumerate((render_frontal, render_lateral)):
        expected = render(f, rng, 48)
        assert np.array_equal(np.asarray(Image.open(images / first["image_path"][view])), expected)


def test_existing_nonempty_dir_raises(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken"):
        synthesize(out, studies=10, image_size=32)
    assert _files(out) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp dir left


def test_existing_empty_dir_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    ann = synthesize(out, studies=10, image_size=32)
    assert ann == out / "annotation.json" and ann.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ----------------------------------------------------------------------------- reports


def test_reports_are_side_free_small_vocabulary_and_short() -> None:
    vocab = report_vocabulary()
    assert len(vocab) <= 80
    assert not {"left", "right"} & vocab
    reports = [e["report"] for e in plan_studies(2000, seed=5)]
    seen = {w for r in reports for w in _words(r)}
    assert seen == vocab  # every phrasing is reachable, nothing outside it
    for r in reports:
        assert not re.search(r"\b(left|right)\b", r, re.IGNORECASE)
        assert len(r.split()) <= 45
        sentences = r.split(". ")
        assert r.endswith(".") and all(s[0].isupper() for s in sentences)


def test_reports_describe_the_findings() -> None:
    """Each finding's words appear iff the finding is present; sentence order is fixed."""
    rng = np.random.default_rng(11)
    order = ["heart|cardiomegaly", "mediastin", "lung|focal", "pleural|pneumothorax"]
    for _ in range(1500):
        f = sample_findings(rng)
        r = write_report(f, rng)
        low, words = r.lower(), set(_words(r))
        assert bool({"enlarged", "cardiomegaly"} & words) == (f.heart == "enlarged")
        assert ("small" in words) == (f.effusion == "small")
        assert ("large" in words) == (f.effusion == "large")
        assert ("bilateral pleural effusion" in low) == (f.effusion != "none")
        assert ("upper lung zone" in low) == (f.opacity == "upper")
        assert ("lower lung zone" in low) == (f.opacity == "lower")
        assert bool(re.search(r"there is a pneumothorax|a pneumothorax is present", low)) == (
            f.pneumothorax == "present")
        assert ("pacemaker" in low) == (f.device == "pacemaker")
        assert ("sternotomy" in low) == (f.device == "sternotomy")
        assert ("lungs are clear" in low) == (f.opacity == "none" and f.effusion == "none")
        positions = [re.search(p, low).start() for p in order]
        assert positions == sorted(positions)
        if f.device != "none":
            assert re.search("pacemaker|sternotomy", r.split(". ")[-1].lower())


def test_priors() -> None:
    rng = np.random.default_rng(2024)
    draws = [sample_findings(rng) for _ in range(6000)]
    normal = np.mean([f.normal for f in draws])
    assert 0.35 <= normal <= 0.41  # 0.3788: default_rng's draws are the same on every platform
    for name in FINDING_NAMES:
        freq = collections.Counter(getattr(f, name) for f in draws)
        assert len(freq) == len(PRIORS[name])
        # Every abnormal class is common enough to learn (>= 5 %), none dominates it.
        assert all(0.05 <= n / len(draws) for n in freq.values()), (name, freq)
    # A large effusion would hide a lower-zone opacity, so they never co-occur.
    assert not any(f.effusion == "large" and f.opacity == "lower" for f in draws)


def test_every_word_is_frequent_in_train_at_100_studies() -> None:
    """R2Gen keeps words seen >= 3 times in train (IU X-Ray threshold)."""
    counts = collections.Counter(
        w for e in plan_studies(100, seed=0) if e["split"] == "train" for w in _words(e["report"]))
    assert {w: counts[w] for w in report_vocabulary() if counts[w] < 3} == {}


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("render", [render_frontal, render_lateral])
def test_findings_change_only_their_own_region(render) -> None:
    """Same rng, one finding toggled: anatomy and noise are shared, so the pixel
    difference is the finding itself, and it lands where the report says it is."""
    size = 64
    top, bottom = slice(0, size // 2), slice(size // 2, size)

    def diff(f: Findings, seed: int) -> np.ndarray:
        a = render(Findings(), np.random.default_rng(seed), size).astype(np.int32)
        return render(f, np.random.default_rng(seed), size).astype(np.int32) - a

    def row_centre(d: np.ndarray) -> float:
        weight = np.abs(d).sum(axis=1)
        return float((weight * (np.arange(size) + 0.5)).sum() / weight.sum() / size)

    # Seeded renders, the same on every machine up to a rare 1-level pixel flip (numpy's SIMD exp/cos),
    # and every threshold clears the 8 seeds' closest value by far more (closest: opacity mean 0.84 > 0.8,
    # i.e. ~170 pixel levels of 4096 pixels; lower-zone centre 0.526 > 0.5).
    for seed in range(8):
        # Effusion: fluid whitens the bases; a large one much more than a small one.
        small, large = diff(Findings(effusion="small"), seed), diff(Findings(effusion="large"), seed)
        assert np.all(small[top] == 0) and small[bottom].mean() > 0.8 and row_centre(small) > 0.65
        assert large[bottom].mean() > 8 and large[bottom].mean() > 3 * small[bottom].mean()
        # Enlarged heart: a bigger bright silhouette in the lower half.
        heart = diff(Findings(heart="enlarged"), seed)
        assert heart[bottom].mean() > 3 and heart[bottom].mean() > abs(heart[top].mean())
        # Opacity: brightens the named zone (vertical centre of mass of the change).
        upper, lower = diff(Findings(opacity="upper"), seed), diff(Findings(opacity="lower"), seed)
        assert upper.mean() > 0.8 and lower.mean() > 0.8
        assert row_centre(upper) < 0.42 and row_centre(lower) > 0.5, (row_centre(upper), row_centre(lower))
        # Pneumothorax: air darkens the upper lung.
        assert diff(Findings(pneumothorax="present"), seed)[top].mean() < -0.7
        # Devices: metal, i.e. a cluster of near-white pixels.
        for device in ("pacemaker", "sternotomy"):
            d = diff(Findings(device=device), seed)
            assert (d > 60).sum() >= 8, (device, seed)


def _features(root: Path, entries: list[dict]) -> np.ndarray:
    """Both views mean-pooled to 16 x 16; the frontal one mirror-folded (a + flip(a)) / 2
    so a finding on either side of the chest lands on the same features."""
    rows = []
    for e in entries:
        views = []
        for i, rel in enumerate(e["image_path"]):
            a = np.asarray(Image.open(root / "images" / rel), np.float32) / 255.0
            if i == 0:
                a = (a + a[:, ::-1]) / 2
            n = a.shape[0] // 16
            views.append(a.reshape(16, n, 16, n).mean(axis=(1, 3)).ravel())
        rows.append(np.concatenate(views))
    return np.asarray(rows)


def test_findings_are_learnable_from_pixels(learn_set: Path) -> None:
    """Ridge regression (one-vs-rest) on 16x16-pooled pixels of the train split must
    predict every finding on held-out val+test far better than the majority class:
    it has to remove at least half of the majority baseline's errors, i.e.
    accuracy >= majority + 0.5 * (1 - majority). (Seeds 0-5 all give >= 0.7.)"""
    ann = json.loads(learn_set.read_text())
    train, held = ann["train"], ann["val"] + ann["test"]
    x_tr, x_te = _features(learn_set.parent, train), _features(learn_set.parent, held)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr = np.c_[(x_tr - mu) / sd, np.ones(len(x_tr))]
    x_te = np.c_[(x_te - mu) / sd, np.ones(len(x_te))]
    gram = x_tr.T @ x_tr + 10.0 * np.eye(x_tr.shape[1])
    report = {}
    for name in FINDING_NAMES:
        classes = sorted({e["findings"][name] for e in train})
        y = np.array([[e["findings"][name] == c for c in classes] for e in train], np.float64)
        w = np.linalg.solve(gram, x_tr.T @ y)
        pred = np.asarray(classes)[(x_te @ w).argmax(1)]
        truth = np.asarray([e["findings"][name] for e in held])
        majority_class = classes[int(y.sum(0).argmax())]
        acc, majority = float((pred == truth).mean()), float((truth == majority_class).mean())
        report[name] = (round(acc, 3), round(majority, 3))
        assert acc >= majority + 0.5 * (1.0 - majority), (name, acc, majority, report)
    print("held-out accuracy vs majority:", report)


# ----------------------------------------------------------------------------- cache


def test_default_dataset_generates_once(tmp_path: Path) -> None:
    ann = default_dataset(studies=10, seed=2, cache_dir=tmp_path)
    assert ann == tmp_path / f"synth-v{DATASET_VERSION}-n10-s2-i256" / "annotation.json"
    assert ann.is_file()
    data = json.loads(ann.read_text())
    with Image.open(ann.parent / "images" / data["train"][0]["image_path"][0]) as im:
        assert im.size == (256, 256) and im.mode == "L"
    mtime = ann.stat().st_mtime_ns
    os.utime(ann, ns=(mtime - 10**9, mtime - 10**9))  # a rewrite would be visible on any file system
    before = ann.stat().st_mtime_ns
    assert default_dataset(studies=10, seed=2, cache_dir=tmp_path) == ann
    assert ann.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == [f"synth-v{DATASET_VERSION}-n10-s2-i256"]  # no temp dir left


def test_default_dataset_env_cache_and_lost_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R2GEN_LAUNCH_CACHE", str(tmp_path / "env-cache"))
    assert synth.cache_root() == tmp_path / "env-cache"
    final = tmp_path / "env-cache" / f"synth-v{DATASET_VERSION}-n10-s0-i256"

    # Simulate another process publishing the set while this one is generating.
    real_write = synth._write_set

    def racing_write(root: Path, *args, **kwargs) -> None:
        real_write(root, *args, **kwargs)
        if not final.exists():
            real_write(final, *args, **kwargs)
            (final / "winner").write_text("")

    monkeypatch.setattr(synth, "_write_set", racing_write)
    ann = default_dataset(studies=10, seed=0)
    assert ann == final / "annotation.json" and ann.is_file()
    assert (final / "winner").exists()  # the loser did not overwrite the winner...
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # ...and discarded its copy
