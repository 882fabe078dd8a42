"""R2Gen's annotation.json format, its up-front validation, the transforms and the data sets.

annotation.json: {"train": [...], "val": [...], "test": [...]}, each entry
{"id", "report", "image_path": [relative paths], "split"}; image paths are relative to the image
directory (default: `images/` beside the annotation file). IU X-Ray studies use two views,
MIMIC-CXR studies one. Everything is checked once, before any training, so a bad file fails in
seconds with one line naming the file and the study. `generate`'s new studies come the same way
(`load_studies`: an annotation without reports) or as a folder (`folder_studies`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from r2gen.data.dicom import is_dicom, read_dicom
from r2gen.data.synth_reports import Findings, synth_findings
from r2gen.data.tokenizer import Tokenizer
from r2gen.errors import DataError
from r2gen.model.r2gen import DATASETS

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Study:
    id: str
    report: str
    images: tuple[Path, ...]
    findings: Findings | None = None  # the embedded synthetic set's labels (its "findings" field); None elsewhere


@dataclass(frozen=True)
class Annotation:
    path: Path
    image_dir: Path
    dataset: str
    splits: dict[str, list[Study]]


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def _parse_study(path: Path, split: str, index: int, entry: object, image_dir: Path, views: int) -> Study:
    where = f"{path}: {split}[{index}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with id, report and image_path")
    if "id" not in entry:
        raise DataError(f"{where}: missing field 'id'")
    study_id = entry["id"]
    if not isinstance(study_id, (str, int)) or isinstance(study_id, bool):
        raise DataError(f"{where}: field 'id' must be a string")
    where = f"{path}: study {str(study_id)!r} ({split}[{index}])"
    for field in ("report", "image_path"):
        if field not in entry:
            raise DataError(f"{where}: missing field {field!r}")
    report, image_paths = entry["report"], entry["image_path"]
    if not isinstance(report, str):
        raise DataError(f"{where}: field 'report' must be a string")
    if not isinstance(image_paths, list) or not all(isinstance(p, str) and p for p in image_paths):
        raise DataError(f"{where}: field 'image_path' must be a list of relative paths")
    if len(image_paths) < views:
        raise DataError(f"{where}: field 'image_path' has {len(image_paths)} image(s), "
                        f"this data set needs {views} per study")
    return Study(str(study_id), report, tuple(image_dir / p for p in image_paths[:views]),
                 synth_findings(entry.get("findings")))


def check_image(image: Path, study: Study, ann_path: Path) -> None:
    """Raise DataError unless the file exists and decodes as an image."""
    if not image.is_file():
        raise DataError(f"{ann_path}: study {study.id!r}: image {image} does not exist")
    if is_dicom(image):
        read_dicom(image)  # decoded whole: a compressed file this machine cannot decode is named now
        return
    try:
        with Image.open(image) as im:
            im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{ann_path}: study {study.id!r}: cannot read image {image} ({type(err).__name__})") from None


def load_annotation(ann_path: Path | str, image_dir: Path | str | None = None, dataset: str = "iu_xray",
                    check_images: bool = True, progress: bool = False) -> Annotation:
    """Parse and validate an annotation file and (optionally) every image it names."""
    path = Path(ann_path)
    if dataset not in DATASETS:
        raise DataError(f"--dataset: unknown {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(image_dir) if image_dir is not None else path.parent / "images"
    if not root.is_dir():
        raise DataError(f"image directory {root} does not exist (set --image-dir)")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with 'train', 'val' and 'test' lists")
    splits: dict[str, list[Study]] = {}
    for split in SPLITS:
        if split not in data:
            raise DataError(f"{path}: missing split {split!r}")
        entries = data[split]
        if not isinstance(entries, list):
            raise DataError(f"{path}: split {split!r} must be a list of studies")
        if not entries:
            raise DataError(f"{path}: split {split!r} is empty")
        splits[split] = [_parse_study(path, split, i, e, root, DATASETS[dataset]) for i, e in enumerate(entries)]
    if check_images:
        _check_all_images(path, splits, progress)
    return Annotation(path, root, dataset, splits)


def annotation_dataset(ann_path: Path | str) -> str:
    """An annotation file's kind, from its format: mimic_cxr where every study lists exactly one image
    (R2Gen's MIMIC-CXR annotation has an entry per image), else iu_xray (two views). What a published
    checkpoint cannot say: the two kinds' models differ in no shape but the vocabulary's size."""
    data = _read_json(Path(ann_path))
    entries = [e for split in SPLITS for e in (data.get(split) if isinstance(data, dict) else None) or []]
    single = [isinstance(e, dict) and isinstance(e.get("image_path"), list) and len(e["image_path"]) == 1
              for e in entries]
    return "mimic_cxr" if single and all(single) else "iu_xray"


def load_studies(ann_path: Path | str, image_dir: Path | str | None, dataset: str) -> list[Study]:
    """New studies from an annotation file in R2Gen's shape whose reports are empty or absent (`generate`):
    the studies of whichever of its splits it has, in file order; every image checked."""
    path = Path(ann_path)
    root = Path(image_dir) if image_dir is not None else path.parent / "images"
    if not root.is_dir():
        raise DataError(f"image directory {root} does not exist (set --image-dir)")
    data = _read_json(path)
    if not isinstance(data, dict) or not any(isinstance(data.get(split), list) for split in SPLITS):
        raise DataError(f"{path}: expected R2Gen's annotation, an object with 'train', 'val' or 'test' lists")
    studies = [_parse_study(path, split, i, {**e, "report": e.get("report") or ""} if isinstance(e, dict) else e,
                            root, DATASETS[dataset])
               for split in SPLITS if isinstance(data.get(split), list) for i, e in enumerate(data[split])]
    if not studies:
        raise DataError(f"{path}: holds no studies")
    for study in studies:
        for image in study.images:
            check_image(image, study, path)
    return studies


def folder_studies(folder: Path, dataset: str) -> list[Study]:
    """New studies in a folder (`generate`): each sub-folder is a study (its name the id) holding exactly
    the kind's views as image files, taken in file-name order (IU X-Ray: two, frontal first, as R2Gen's
    0.png and 1.png; MIMIC-CXR: one); for MIMIC-CXR an image file right in the folder is a study too (its
    stem the id). Hidden entries are skipped; every image is checked."""
    views = DATASETS[dataset]
    studies: dict[str, Study] = {}
    for entry in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if entry.is_dir():
            images = tuple(sorted(p for p in entry.iterdir() if not p.name.startswith(".")))
            if len(images) != views:
                raise DataError(f"{entry}: {len(images)} file(s); a {dataset} study folder holds its {views} "
                                f"view(s) and nothing else")
        elif views > 1:
            raise DataError(f"{entry}: a file right in {folder}; each {dataset} study is a folder of its {views} views")
        else:
            images = (entry,)
        study = Study(entry.name if entry.is_dir() else entry.stem, "", images)
        if study.id in studies:
            raise DataError(f"{entry}: study id {study.id!r} twice in {folder}")
        for image in images:
            check_image(image, study, folder)
        studies[study.id] = study
    if not studies:
        raise DataError(f"{folder}: holds no studies")
    return list(studies.values())


def _check_all_images(path: Path, splits: dict[str, list[Study]], progress: bool) -> None:
    pairs = [(image, study) for studies in splits.values() for study in studies for image in study.images]
    if not progress:
        for image, study in pairs:
            check_image(image, study, path)
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"checking {len(pairs)} images", total=len(pairs))
        for image, study in pairs:
            check_image(image, study, path)
            bar.advance(task)


def build_transform(image_size: int, train: bool) -> transforms.Compose:
    """R2Gen's transforms scaled to image_size (224 gives exactly Resize 256 / RandomCrop 224).

    The last two steps (ToTensor, Normalize) are the ones a uint8 loader leaves to the device
    (`images_to_device`); the steps before them only move, crop and flip pixels.
    """
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                                   transforms.RandomCrop(image_size),
                                   transforms.RandomHorizontalFlip(), *normalize])
    return transforms.Compose([transforms.Resize((image_size, image_size)), *normalize])


GRAY_MODES = ("L", "I;16", "I")
"""PIL modes decoded as one channel: their RGB conversion repeats that channel (checked for each)."""


def open_image(path: Path) -> Image.Image:
    """A decoded image, one channel for grayscale files (R2Gen's RGB conversion only copies it); DICOM files
    through r2gen.data.dicom."""
    if is_dicom(path):
        return read_dicom(path)
    with Image.open(path) as im:
        return im.convert("L" if im.mode in GRAY_MODES else "RGB")


def images_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A collated image batch on the device, as the model takes it: (B, views, 3, H, W) float.

    uint8 batches (one channel for grayscale) are converted and normalized there, with the very
    operations of ToTensor and Normalize (divide by 255, subtract the mean, divide by the std), so
    the values equal the host pipeline's bit for bit while the host moves 12x fewer bytes.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    mean, std = _normalization(images.device)
    # Three channels first, then in place: the float batch is the only float tensor made, as on the host.
    rgb = images.expand(*images.shape[:-3], 3, *images.shape[-2:]).float()
    return rgb.div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize's mean and std as (3, 1, 1) float32 tensors on the device, made once per device (a
    copy from host memory at every step would make the host wait for the GPU)."""
    return (torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1))


def _as_uint8(image: Image.Image) -> torch.Tensor:
    """(C, H, W) uint8 of a PIL image in mode L or RGB."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


def _stack_views(views: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Stack uint8 images whose channel counts may differ (a colour file among grayscale ones)."""
    channels = max(v.size(-3) for v in views)
    return torch.stack([v.expand(*v.shape[:-3], channels, *v.shape[-2:]) for v in views], dim)


class ReportDataset(Dataset):
    """(study id, images (views, 3, H, W), token ids, mask) per study, as R2Gen's data sets.

    cache=True decodes every image once, up front, through the transform's first step (a
    deterministic Resize), and keeps it in RAM as uint8 (one channel for grayscale files); items are
    then identical to the uncached ones, without decoding a PNG/JPEG per sample.

    uint8=True stops before the transform's ToTensor and Normalize: images come as uint8
    (views, C, H, W), C = 1 for grayscale, and `images_to_device` finishes them on the device.
    """

    def __init__(self, studies: Sequence[Study], tokenizer: Tokenizer, max_seq_length: int,
                 transform: transforms.Compose, cache: bool = False, progress: bool = False,
                 uint8: bool = False):
        self.studies = list(studies)
        self.transform = transform
        self.uint8 = uint8
        self.ids = [tokenizer.encode(s.report)[:max_seq_length] for s in self.studies]
        self.cached: list[list[np.ndarray]] | None = None
        if cache:
            self.cached = self._decode_all(progress)

    def _decode_all(self, progress: bool) -> list[list[np.ndarray]]:
        from concurrent.futures import ThreadPoolExecutor

        resize = self.transform.transforms[0]

        def decode(study: Study) -> list[np.ndarray]:
            return [np.asarray(resize(open_image(image))) for image in study.images]

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(decode, self.studies)
            if not progress:
                return list(results)
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task(f"caching {len(self.studies)} studies' images in RAM", total=len(self.studies))
                out = []
                for views in results:
                    out.append(views)
                    bar.advance(task)
                return out

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[str, torch.Tensor, list[int]]:
        """`key` is an index, or (index, seed) from r2gen.data.order.EpochSampler: the random
        crop and flip then draw from that seed, whichever process or worker runs them. Only the CPU
        generator is seeded (and put back after): torch.manual_seed would also reseed every GPU's
        generator, and in a loader without workers the model's dropout masks would then follow the
        last study's seed instead of the run's."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self._item(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._item(index)

    def _item(self, index: int) -> tuple[str, torch.Tensor, list[int]]:
        study = self.studies[index]
        if self.cached is not None:
            images, steps = [Image.fromarray(pixels) for pixels in self.cached[index]], self.transform.transforms[1:]
        else:
            images, steps = [open_image(image) for image in study.images], self.transform.transforms
        if self.uint8:
            geometry = transforms.Compose(steps[:-2])  # all but ToTensor and Normalize
            views = _stack_views([_as_uint8(geometry(im)) for im in images])
        else:
            views = torch.stack([transforms.Compose(steps)(im.convert("RGB")) for im in images], 0)
        return study.id, views, self.ids[index]


def collate(batch: Sequence[tuple[str, torch.Tensor, list[int]]]) -> dict:
    """Stack images; pad ids with 0 to the longest in the batch; mask marks real tokens."""
    ids, images, seqs = zip(*batch)
    width = max(len(s) for s in seqs)
    targets = torch.zeros(len(seqs), width, dtype=torch.long)
    masks = torch.zeros(len(seqs), width, dtype=torch.float32)  # FloatTensor, as R2Gen's collate_fn
    for i, seq in enumerate(seqs):
        targets[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        masks[i, :len(seq)] = 1
    stacked = _stack_views(images) if images[0].dtype == torch.uint8 else torch.stack(images, 0)
    return {"ids": list(ids), "images": stacked, "targets": targets, "masks": masks}
