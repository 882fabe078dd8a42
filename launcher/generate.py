"""`r2gen-launch generate`: reports for new studies from a checkpoint of any engine, or a published R2Gen one.

The input is a folder of studies (r2gen.data.datasets.folder_studies: IU X-Ray, a sub-folder per
study with its two views; MIMIC-CXR, one image per study, as a file right in the folder or a
sub-folder holding it) or an annotation.json in R2Gen's shape with empty or absent reports
(`load_studies`). Every image is checked, and the output folder too, before the model is built. The
studies go through evaluation's own loader (build_loader: the eval transform, its batches) and the
fast batched beam search. Written: reports.jsonl and reports.csv, a row per study: its id, image
paths, report and, where the checkpoint's vocabulary is the embedded synthetic set's, the findings
the report states (r2gen.findings; absent on other data, never zeros).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from r2gen.errors import ConfigError

OUTPUTS = ("reports.jsonl", "reports.csv")


@dataclass(frozen=True)
class Generated:
    checkpoint: Path
    beam_size: int
    studies: int
    samples_per_s: float
    output: Path
    findings: bool  # whether the rows carry the findings their reports state


def generate_reports(checkpoint: Path, input_path: Path, beam_size: int | None = None, ann_path: Path | None = None,
                     image_dir: Path | None = None, device: str | None = None, precision: str | None = None,
                     num_workers: int | None = None, output: Path | None = None, force: bool = False) -> Generated:
    """Check the input and the output folder, then write a report per study; bad input is a ConfigError
    or DataError line before any model work."""
    from launcher.evaluate import check_beam_size, inference_backend, open_checkpoint
    from r2gen.build import Prepared
    from r2gen.data.datasets import Annotation, folder_studies, load_studies
    from r2gen.data.loader import build_loader
    from r2gen.findings import speaks_synthetic

    check_beam_size(beam_size)
    if not input_path.exists():
        raise ConfigError(f"--input: {input_path} does not exist")
    if image_dir is not None and input_path.is_dir():
        raise ConfigError("--image-dir: only for an --input annotation (a folder's images are in it)")
    opened = open_checkpoint(checkpoint, ann_path, check_images=False)
    if ann_path is not None and opened.annotation is None:
        raise ConfigError(f"--ann-path: only for a published R2Gen checkpoint; {opened.state_path} has its own "
                          "vocabulary")
    cfg = opened.inference_config(beam_size, num_workers)
    dataset = cfg.model.dataset
    studies = (folder_studies(input_path, dataset) if input_path.is_dir()
               else load_studies(input_path, image_dir, dataset))
    out_dir = output or opened.output_path(f"generate-{input_path.stem}", cfg.beam_size)
    if not force and any((out_dir / name).exists() for name in OUTPUTS):
        raise ConfigError(f"--out: {out_dir} already holds reports; choose another --out, or --force to replace them")

    backend = inference_backend(device, precision)
    model = opened.model().to(backend.device).eval()
    where = input_path if input_path.is_dir() else (image_dir or input_path.parent / "images")
    prep = Prepared(cfg, backend, Annotation(input_path, where, dataset, {"input": studies}), opened.tokenizer,
                    model, opened.trained.source)
    began = time.perf_counter()
    reports = _generate(prep, build_loader(prep, "input", train=False))
    speed = len(reports) / max(time.perf_counter() - began, 1e-9)
    findings = speaks_synthetic(opened.tokenizer.token2idx)
    rows = [_row(study, report, findings) for study, report in zip(studies, reports)]
    _write(out_dir, rows)
    return Generated(opened.state_path, cfg.beam_size, len(rows), speed, out_dir, findings)


def _generate(prep, loader) -> list[str]:
    """A report per study, in the loader's (the input's) order, batch by batch (halving a batch that
    runs out of GPU memory)."""
    import torch

    from launcher.console import counting
    from r2gen.data.datasets import images_to_device
    from r2gen.model.generation import generate
    from r2gen.speedups import cudnn_autotuning
    from r2gen.step import OomRecovery, release_memory, split_batch

    cfg, backend, model = prep.cfg, prep.backend, prep.model
    guard = OomRecovery(loader.batch_size or 1, retries=cfg.oom_retries)

    def in_chunks(batch: dict, micro: int) -> list[list[int]]:
        seqs: list[list[int]] = []
        for chunk in split_batch(batch, micro):
            with backend.autocast():
                images = images_to_device(chunk["images"], backend.device)
                seqs += generate(model, images, cfg.beam_size, cfg.block_trigrams).cpu().tolist()
        return seqs

    reports: list[str] = []
    with counting("generating reports", len(loader.dataset)) as advance:
        for batch in loader:
            with torch.no_grad(), cudnn_autotuning(False):  # generation's shapes are not worth autotuning
                seqs = guard.run(lambda micro: in_chunks(batch, micro), lambda: release_memory(backend))
            reports += prep.tokenizer.decode_batch(seqs)
            advance(len(batch["ids"]))
    return reports


def _row(study, report: str, findings: bool) -> dict:
    from r2gen.findings import read_findings

    row = {"id": study.id, "images": [str(p) for p in study.images], "report": report}
    if findings:
        row["findings"] = read_findings(report).as_dict()
    return row


def _write(out_dir: Path, rows: list[dict]) -> None:
    from r2gen.atomic import write_text
    from r2gen.findings import FINDING_NAMES

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "reports.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    labels = list(FINDING_NAMES) if rows and "findings" in rows[0] else []
    text = io.StringIO()
    table = csv.writer(text)
    table.writerow(["id", "images", "report", *labels])
    for row in rows:
        table.writerow([row["id"], ";".join(row["images"]), row["report"], *(row["findings"][k] for k in labels)])
    write_text(out_dir / "reports.csv", text.getvalue())
