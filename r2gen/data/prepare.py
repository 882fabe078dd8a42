"""`r2gen-launch data prepare`: a data set's images rewritten once at training resolution.

MIMIC-CXR's images are ~2500x3000 JPEGs: decoding one costs far more than the training step
spends on it. Preparing decodes every image once, applies the first (deterministic) step of the
transform its split uses, and stores the result as a lossless PNG (one channel for grayscale):
train images resized so the shorter side is image_size * 256 / 224 (R2Gen's Resize(256)), val and
test images resized to image_size x image_size (R2Gen's Resize((224, 224))). Training on the
prepared set then gives bit for bit the tensors the original files give, since resizing an image
to its own size is a copy (tests/test_prepare.py), at a fraction of the decoding cost.

The new set (annotation.json, images/, prepared.json) appears atomically; a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from r2gen.atomic import write_dir_atomically
from r2gen.data.datasets import SPLITS, Annotation, build_transform, load_annotation, open_image
from r2gen.errors import ConfigError, DataError
from r2gen.model.r2gen import DATASETS

PREPARED_FILE = "prepared.json"
PNG_COMPRESS_LEVEL = 3  # about as small as level 6 on radiographs, much faster to write


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path
    image_size: int
    train: bool


def _convert(job: _Job) -> str | None:
    """Decode, resize and write one image; the error's text if it cannot be read."""
    try:
        image = open_image(job.source)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        return type(err).__name__
    resize = build_transform(job.image_size, job.train).transforms[0]
    resize(image).save(job.target, compress_level=PNG_COMPRESS_LEVEL)
    return None


def prepare_dataset(ann_path: Path, out_dir: Path, image_size: int = 224, dataset: str = "iu_xray",
                    image_dir: Path | None = None, workers: int | None = None, progress: bool = False) -> Path:
    """Write the prepared set into out_dir (which must not exist or be empty); its annotation path."""
    if image_size < 32:
        raise ConfigError(f"--image-size: must be at least 32 px, got {image_size}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: must be positive, got {workers}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} exists and is not empty")
    annotation = load_annotation(ann_path, image_dir, dataset, check_images=False)
    raw = json.loads(Path(ann_path).read_text(encoding="utf-8"))
    views = DATASETS[dataset]

    def write(tmp: Path) -> None:
        jobs: list[tuple[str, _Job]] = []
        rewritten: dict[str, list[dict]] = {}
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            rewritten[split] = []
            for index, (entry, study) in enumerate(zip(raw[split], annotation.splits[split])):
                names = [f"{split}/{index:07d}-{view}.png" for view in range(views)]
                rewritten[split].append({**entry, "image_path": names})
                for name, source in zip(names, study.images):
                    where = f"{annotation.path}: study {study.id!r}: cannot read image {source}"
                    jobs.append((where, _Job(source, tmp / "images" / name, image_size, split == "train")))
        _run(jobs, workers or min(16, os.cpu_count() or 1), progress)
        (tmp / "annotation.json").write_text(json.dumps(rewritten, indent=1) + "\n", encoding="utf-8")
        facts = {"source": str(annotation.path), "image_dir": str(annotation.image_dir), "dataset": dataset,
                 "image_size": image_size, "train_shorter_side": round(image_size * 256 / 224),
                 "images": len(jobs)}
        (tmp / PREPARED_FILE).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")

    if not write_dir_atomically(out, write):
        raise ConfigError(f"--out: {out} was filled by something else while preparing")
    return out / "annotation.json"


def _run(jobs: list[tuple[str, _Job]], workers: int, progress: bool) -> None:
    """Convert every image in a process pool, with a progress bar; the first failure stops it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with ProcessPoolExecutor(max_workers=workers) as pool, \
            Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task(f"preparing {len(jobs)} images", total=len(jobs))
        results = pool.map(_convert, [job for _, job in jobs], chunksize=max(1, min(64, len(jobs) // (4 * workers))))
        for (where, _), error in zip(jobs, results):
            if error is not None:
                pool.shutdown(cancel_futures=True)
                raise DataError(f"{where} ({error})")
            bar.advance(task)


def prepared_image_size(ann_path: Path) -> int | None:
    """The image size a set was prepared for (its prepared.json), or None for an original set."""
    facts = Path(ann_path).parent / PREPARED_FILE
    if not facts.is_file():
        return None
    try:
        return int(json.loads(facts.read_text(encoding="utf-8"))["image_size"])
    except (ValueError, KeyError, TypeError):
        return None


LARGE_IMAGE_FACTOR = 2
"""Images whose shorter side exceeds the training resize by this factor are worth preparing."""


def preparation_hint(annotation: Annotation, image_size: int, sample: int = 8) -> str | None:
    """A one-line suggestion to run `data prepare` when the set's images are much larger than
    training uses (read from the headers of a few train images), else None."""
    from PIL import Image

    from r2gen.data.dicom import dicom_size, is_dicom

    side = round(image_size * 256 / 224)
    sides = []
    for study in annotation.splits["train"][:sample]:
        if is_dicom(study.images[0]):
            sides.append(min(dicom_size(study.images[0])))  # the header only, as for the other formats
            continue
        with Image.open(study.images[0]) as im:  # the header only: no decoding
            sides.append(min(im.size))
    if not sides or min(sides) < LARGE_IMAGE_FACTOR * side:
        return None
    return (f"{annotation.path}'s images are about {min(sides)} px on their shorter side, training uses {side}: "
            f"decoding them costs more than the step; `r2gen-launch data prepare --ann-path {annotation.path} "
            f"--out DIR --image-size {image_size}` does it once")
