"""Host cost of one training study in the loader: R2Gen's host pipeline against the uint8 one.

    python bench/loader.py --studies 100 --image-size 224

One core (torch.set_num_threads(1)), as one loader worker has: milliseconds per study (two views,
the train transforms with their random crop and flip) for each of decoding every PNG/JPEG or the
RAM image cache, and float batches (ToTensor + Normalize on the host) or uint8 batches (normalized
on the device). The studies per second of one core, against a training rate, say how many loader
workers the GPU needs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2gen.data.datasets import ReportDataset, build_transform, load_annotation  # noqa: E402
from r2gen.data.synth import default_dataset  # noqa: E402
from r2gen.data.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100, help="train studies timed per row")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--ann-path", type=Path, default=None, help="[default: the embedded set]")
    parser.add_argument("--dataset", default="iu_xray")
    args = parser.parse_args()
    torch.set_num_threads(1)
    annotation = load_annotation(args.ann_path or default_dataset(studies=max(400, args.studies * 2)), None,
                                 args.dataset)
    tokenizer = Tokenizer.from_reports(annotation.dataset, (s.report for s in annotation.splits["train"]), 3)
    studies = annotation.splits["train"][:args.studies]
    table = Table(title=f"loader cost per training study, one core, {args.image_size} px, {len(studies)} studies "
                        f"of {annotation.path}")
    for column in ("images", "batches", "ms / study", "studies/s per core"):
        table.add_column(column, justify="right")
    for cache in (False, True):
        for uint8 in (False, True):
            dataset = ReportDataset(studies, tokenizer, 60, build_transform(args.image_size, True), cache=cache,
                                    uint8=uint8)
            for i in range(min(5, len(dataset))):
                dataset[(i, i)]  # warm-up
            start = time.perf_counter()
            for i in range(len(dataset)):
                dataset[(i, i)]
            per_study = (time.perf_counter() - start) / len(dataset)
            table.add_row("RAM cache" if cache else "decoded per sample", "uint8" if uint8 else "float (host)",
                          f"{1000 * per_study:.2f}", f"{1 / per_study:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
