"""R2Gen's tokenizer: report cleaning rules, a vocabulary from the train split, encode and decode.

The cleaning reproduces the published rules (zhjohnchan/R2Gen modules/tokenizers.py) exactly,
quirks included, because the vocabulary and the metrics depend on them:
- the punctuation class `[.,?;*!%^&_+():-\\[\\]{}]` contains the range `:-\\[`, so it also removes
  `<`, `=`, `>`, `@` (and capitals, though text is lower-cased first);
- the published filter `sent != []` never drops anything, so empty sentences are kept and give
  ` . . ` sequences.
Id 0 is bos, eos and pad; tokens are numbered from 1 in sorted order, `<unk>` included.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence

_PUNCT = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
_NUMBERING = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "),
              (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))
"""Enumerations removed after the repeated-period collapse, in the published order."""

THRESHOLDS = {"iu_xray": 3, "mimic_cxr": 10}
"""Minimum train-split count for a word to enter the vocabulary (the published defaults)."""


def _replace_n(text: str, old: str, new: str, times: int) -> str:
    # The published cleaners call .replace a fixed number of times; that count matters for runs
    # longer than it collapses, so it is kept rather than looping to a fixed point.
    for _ in range(times):
        text = text.replace(old, new)
    return text


def _clean_sentence(sentence: str) -> str:
    for ch in ('"', "/", "\\", "'"):
        sentence = sentence.replace(ch, "")
    return _PUNCT.sub("", sentence.strip().lower())


def _join(text: str) -> str:
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    sentences = [_clean_sentence(s) for s in text.strip().lower().split(". ")]
    return " . ".join(sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
    return _join(_replace_n(report, "..", ".", 3))


def clean_report_mimic_cxr(report: str) -> str:
    text = report.replace("\n", " ")
    text = _replace_n(text, "__", "_", 7)
    text = _replace_n(text, "  ", " ", 6)
    text = _replace_n(text, "..", ".", 8)
    return _join(text)


CLEANERS = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}


class Tokenizer:
    """Vocabulary built from train reports; `encode` gives [0, ids..., 0] as R2Gen does."""

    UNK = "<unk>"

    def __init__(self, dataset: str, token2idx: dict[str, int]):
        if dataset not in CLEANERS:
            raise ValueError(f"dataset: unknown {dataset!r}; choose one of {', '.join(CLEANERS)}")
        if self.UNK not in token2idx:
            raise ValueError("vocabulary lacks <unk>")
        self.dataset = dataset
        self.clean = CLEANERS[dataset]
        self.token2idx = dict(token2idx)
        self.idx2token = {i: t for t, i in self.token2idx.items()}

    @classmethod
    def from_reports(cls, dataset: str, reports: Iterable[str], threshold: int | None = None) -> "Tokenizer":
        """Vocabulary of the words seen at least `threshold` times (default: the data set's)."""
        if dataset not in CLEANERS:
            raise ValueError(f"dataset: unknown {dataset!r}; choose one of {', '.join(CLEANERS)}")
        threshold = THRESHOLDS[dataset] if threshold is None else threshold
        counter = Counter(tok for report in reports for tok in CLEANERS[dataset](report).split())
        vocab = sorted([tok for tok, n in counter.items() if n >= threshold] + [cls.UNK])
        return cls(dataset, {tok: i + 1 for i, tok in enumerate(vocab)})

    def __len__(self) -> int:
        return len(self.token2idx)

    def encode(self, report: str) -> list[int]:
        unk = self.token2idx[self.UNK]
        return [0] + [self.token2idx.get(tok, unk) for tok in self.clean(report).split()] + [0]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens up to the first 0, joined by spaces."""
        words = []
        for idx in ids:
            if idx <= 0:
                break
            words.append(self.idx2token[int(idx)])
        return " ".join(words)

    def decode_batch(self, ids_batch: Sequence[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in ids_batch]

    def to_json(self) -> str:
        return json.dumps({"dataset": self.dataset, "token2idx": self.token2idx}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        data = json.loads(text)
        return cls(data["dataset"], data["token2idx"])
