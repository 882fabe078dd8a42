"""Evaluation: a report generated for every study of a split, scored (R2Gen's metrics, the findings F1).

`evaluate` runs every epoch on val (and on test for the last and the best model) and for
`r2gen-launch evaluate`; `evaluate_split` is the loop's call, writing the reports; the
constant-report baseline is the bar a model has to clear.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from r2gen.atomic import write_json
from r2gen.clinical import write_labeler_inputs
from r2gen.build import Prepared
from r2gen.config import TrainConfig
from r2gen.data.datasets import images_to_device
from r2gen.data.tokenizer import Tokenizer
from r2gen.engine import TrainingEngine
from r2gen.findings import findings_scores, labelled
from r2gen.scores import compute_scores
from r2gen.model.generation import beam_search, generate_from_features, greedy
from r2gen.model.r2gen import R2GenModel, masked_nll, target_tokens
from r2gen.speedups import cudnn_autotuning
from r2gen.step import OomRecovery, release_memory, split_batch


def evaluate(model: R2GenModel, loader: DataLoader, backend: TrainingEngine, tokenizer: Tokenizer,
             cfg: TrainConfig) -> tuple[dict[str, float | None], list[dict], float]:
    """Generate a report for every study; returns metrics (with `loss`, the teacher-forced per-token
    NLL of the true reports, as in training but without dropout), per-study records and samples/s."""
    model.eval()
    records: list[dict] = []
    start = time.perf_counter()
    guard = OomRecovery(loader.batch_size or 1, retries=cfg.oom_retries)
    nll, tokens = 0.0, 0.0

    def generate_in_chunks(batch: dict, micro: int) -> tuple[list[list[int]], float]:
        out: list[list[int]] = []
        summed = 0.0
        for chunk in split_batch(batch, micro):
            images = images_to_device(chunk["images"], backend.device)
            targets = chunk["targets"].to(backend.device, non_blocking=True)
            with backend.autocast():
                att_feats, _ = model.extract(images)  # once, for the loss and the reports
                logprobs = model.forward_features(att_feats, targets)
                if cfg.reference_generation:  # the published decoding, from the images (bench/time_to_quality.py)
                    seqs = (beam_search(model, images, cfg.beam_size) if cfg.beam_size > 1
                            else greedy(model, images, cfg.block_trigrams))
                else:
                    seqs = generate_from_features(model, att_feats, beam_size=cfg.beam_size,
                                                  block_trigrams=cfg.block_trigrams)
                out += seqs.cpu().tolist()
            summed += masked_nll(logprobs.float(), targets, chunk["masks"].to(backend.device), 1.0).item()
        return out, summed

    for batch in loader:
        with torch.no_grad(), cudnn_autotuning(False):  # generation's shapes are not worth autotuning
            seqs, summed = guard.run(lambda micro: generate_in_chunks(batch, micro), lambda: release_memory(backend))
        nll += summed
        tokens += float(target_tokens(batch["masks"]))
        generated = tokenizer.decode_batch(seqs)
        truths = tokenizer.decode_batch(batch["targets"][:, 1:].tolist())
        records += [{"id": i, "ground_truth": g, "generated": r} for i, g, r in zip(batch["ids"], truths, generated)]
    speed = len(records) / max(time.perf_counter() - start, 1e-9)
    model.train()
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()  # generation's blocks have other shapes than training's: give them back
    scores = compute_scores([r["ground_truth"] for r in records], [r["generated"] for r in records])
    scores["loss"] = nll / max(tokens, 1.0)
    return {**scores, **split_findings_scores(loader.dataset.studies, records)}, records, speed


def evaluate_split(model: R2GenModel, loaders: Mapping[str, DataLoader], backend: TrainingEngine,
                   tokenizer: Tokenizer, cfg: TrainConfig, reports: Path, split: str, epoch: int,
                   name: str | None = None) -> dict:
    """evaluate() on `split` (its loader from `loaders`), the records written to reports/<name>_epochNNN.json;
    the scores as `name/<key>` (name: the split, unless given), with the generation's samples/s."""
    scores, records, speed = evaluate(model, loaders[split], backend, tokenizer, cfg)
    name = name or split
    write_json(reports / f"{name}_epoch{epoch:03d}.json", records)
    if split == "test":  # the CheXpert labeler's inputs, for clinical efficacy (r2gen-launch ce)
        write_labeler_inputs(records, reports / f"{name}_epoch{epoch:03d}")
    return {**{f"{name}/{k}": v for k, v in scores.items()}, f"perf/{split}_generate_samples_per_s": speed}


def split_findings_scores(studies, records: list[dict]) -> dict[str, float | None]:
    """Findings accuracy and F1 of the records' generated reports (r2gen.findings), where every study of
    the split has the embedded set's labels; {} on other data (the keys are absent, not zero)."""
    truth = {s.id: s.findings for s in studies}
    truths = labelled([truth.get(r["id"]) for r in records])
    return findings_scores(truths, [r["generated"] for r in records]) if truths else {}


def constant_report_baseline(prep: Prepared, split: str = "test") -> dict[str, float | None]:
    """Scores on `split` of always answering the most frequent train report (the bar to clear)."""
    max_len = prep.cfg.model.max_seq_length
    as_truth = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:])
                for s in prep.annotation.splits["train"]]
    counts = Counter(as_truth)
    constant = min(counts, key=lambda r: (-counts[r], r))
    studies = prep.annotation.splits[split]
    truths = [prep.tokenizer.decode(prep.tokenizer.encode(s.report)[:max_len][1:]) for s in studies]
    records = [{"id": s.id, "generated": constant} for s in studies]
    return {**compute_scores(truths, [constant] * len(truths)), **split_findings_scores(studies, records)}
