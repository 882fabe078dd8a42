"""Clinical efficacy (CE): the CheXpert labeler's 14 observations on generated and true reports, scored as
the published R2Gen scores them (its compute_ce.py and modules/metrics.py: compute_mlc).

The labeler (stanfordmlgroup/chexpert-labeler, or CheXbert) runs outside this project: it reads one
report per row (`write_labeler_inputs` writes the generated and the true reports of an evaluation so)
and writes a CSV whose first column holds the report ("Reports"; CheXbert: "Report Impression") and
then one column per observation: 1 positive, 0 negative, -1 uncertain, blank not mentioned.
`read_labelled` reads it; as published, blank and uncertain count as negative. `clinical_efficacy`
then takes scikit-learn's precision, recall and F1 (macro and micro over the observations, and per
observation with its support) and each observation's AUROC with their mean, the published
definitions computed by the same library (the `ce` extra: pip install 'r2gen-launch[ce]').
One difference: an observation whose true labels are all one class has no AUROC (the published code
stops with scikit-learn's error there); it is reported as None and left out of the mean.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from r2gen.atomic import write_text
from r2gen.errors import UsageError

REPORT_COLUMNS = ("Reports", "Report Impression")
"""The report's column in the CheXpert labeler's output, and in CheXbert's."""


@dataclass(frozen=True)
class Labelled:
    """One labelled CSV: its reports, observation names and 0/1 labels (one row per report)."""

    path: Path
    reports: tuple[str, ...]
    observations: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]


def read_labelled(path: Path, flag: str) -> Labelled:
    """The labeler's output CSV; a UsageError naming the file, and the row and column, for what is not one."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UsageError(f"{flag}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{flag}: {path} cannot be read as CSV ({err})") from None
    if not rows or len(rows[0]) < 2:
        raise UsageError(f"{flag}: {path} has no header of a report column and observation columns")
    header = [name.strip() for name in rows[0]]
    if header[0] not in REPORT_COLUMNS:
        raise UsageError(f"{flag}: {path}: the first column is {header[0]!r}, not the labeler's report column "
                         f"({' or '.join(REPORT_COLUMNS)})")
    labels = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UsageError(f"{flag}: {path} line {number}: {len(row)} cells, the header has {len(header)}")
        labels.append(tuple(_label(cell, path, number, name, flag) for cell, name in zip(row[1:], header[1:])))
    if not labels:
        raise UsageError(f"{flag}: {path} has no labelled reports")
    return Labelled(path, tuple(row[0] for row in rows[1:]), tuple(header[1:]), tuple(labels))


def _label(cell: str, path: Path, line: int, column: str, flag: str) -> int:
    """1 for a positive mention; 0 for negative, uncertain (-1) and blank, as the published code counts them."""
    text = cell.strip()
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, 0.0, -1.0):
        raise UsageError(f"{flag}: {path} line {line}, column {column!r}: {cell!r} is not 1, 0, -1 or blank")
    return int(value == 1.0)


def check_pair(truth: Labelled, generated: Labelled, written: list[dict] | None = None) -> None:
    """The two files describe the same studies in the same order, with the same observations: a
    UsageError naming what differs. `written`: the evaluation's records (id, ground_truth, generated)
    the labeler's inputs were written from, compared report by report."""
    if truth.observations != generated.observations:
        first = next((i for i, (a, b) in enumerate(zip(truth.observations, generated.observations)) if a != b),
                     min(len(truth.observations), len(generated.observations)))
        raise UsageError(f"--generated: {generated.path} has other observation columns than {truth.path} "
                         f"(column {first + 2}: {_column(generated.observations, first)} vs "
                         f"{_column(truth.observations, first)})")
    if len(truth.labels) != len(generated.labels):
        raise UsageError(f"--generated: {generated.path} labels {len(generated.labels)} reports, {truth.path} "
                         f"{len(truth.labels)}: not the same studies")
    if written is None:
        return
    if len(written) != len(truth.labels):
        raise UsageError(f"--reports: {len(written)} studies written, the labelled files have {len(truth.labels)}")
    for flag, labelled, key in (("--truth", truth, "ground_truth"), ("--generated", generated, "generated")):
        for row, (report, record) in enumerate(zip(labelled.reports, written), start=2):
            if " ".join(report.split()) != " ".join(record[key].split()):
                raise UsageError(f"{flag}: {labelled.path} line {row} is not study {record['id']}'s report as "
                                 "written for the labeler (another order, or another evaluation's file?)")


def read_written(path: Path) -> list[dict]:
    """The records (id, generated, ground_truth) an evaluation's JSON holds: a run's reports/<split>_epochNNN.json
    (a list) or `evaluate`'s output (under "reports"); a UsageError naming --reports for anything else."""
    import json

    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--reports: {path} cannot be read as JSON ({exc})") from None
    records = held.get("reports") if isinstance(held, dict) else held
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"id", "generated", "ground_truth"} <= r.keys()
                                                for r in records):
        raise UsageError(f"--reports: {path} is not an evaluation's reports (records of id, generated and ground_truth)")
    return records


def _column(names: tuple[str, ...], i: int) -> str:
    return repr(names[i]) if i < len(names) else "none"


def clinical_efficacy(truth: Labelled, generated: Labelled) -> dict:
    """The published CE scores: {"macro": {precision, recall, f1}, "micro": {...}, "auroc_mean": float | None,
    "observations": {name: {precision, recall, f1, support, auroc}}}."""
    try:
        from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    except ImportError:
        raise UsageError("ce: scikit-learn is not installed (pip install 'r2gen-launch[ce]')") from None
    import numpy as np

    gt, pred = np.array(truth.labels), np.array(generated.labels)
    result: dict = {"studies": len(gt)}
    for average in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(gt, pred, average=average, zero_division=0)
        result[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    p, r, f, support = precision_recall_fscore_support(gt, pred, average=None, zero_division=0)
    observations = {}
    for i, name in enumerate(truth.observations):
        one_class = len(set(gt[:, i].tolist())) < 2
        auroc = None if one_class else float(roc_auc_score(gt[:, i], pred[:, i]))
        observations[name] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(support[i]), "auroc": auroc}
    aurocs = [o["auroc"] for o in observations.values() if o["auroc"] is not None]
    result["auroc_mean"] = sum(aurocs) / len(aurocs) if aurocs else None
    result["observations"] = observations
    return result


def write_labeler_inputs(records: list[dict], stem: Path) -> tuple[Path, Path]:
    """The generated and the true reports of an evaluation's records as the CheXpert labeler reads them
    (one report per row, no header, CSV-quoted), in the records' order: <stem>.generated.csv and
    <stem>.truth.csv. Returns their paths."""
    paths = []
    for key, suffix in (("generated", ".generated.csv"), ("ground_truth", ".truth.csv")):
        path = stem.with_name(stem.name + suffix)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([record[key]] for record in records)
        write_text(path, buffer.getvalue())
        paths.append(path)
    return paths[0], paths[1]
