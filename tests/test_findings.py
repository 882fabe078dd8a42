"""Clinical accuracy on the embedded set: reports read back to their findings exactly, and the scores
(per-finding accuracy, exact match, macro F1 over the abnormal values) by hand-counted cases."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from r2gen.data.datasets import Study, load_annotation
from r2gen.data.synth_reports import PRIORS, Findings, synth_findings, write_report
from r2gen.data.tokenizer import Tokenizer
from r2gen.findings import ABNORMAL, FINDINGS_KEYS, findings_scores, labelled, read_findings
from r2gen.evaluate import split_findings_scores

ALL = [Findings(*values) for values in itertools.product(*(list(t) for t in PRIORS.values()))]


def test_every_report_the_set_writes_reads_back_to_its_findings_also_after_the_tokenizer() -> None:
    reports = [(f, write_report(f, np.random.default_rng([seed, i]))) for i, f in enumerate(ALL) for seed in range(12)]
    tokenizer = Tokenizer.from_reports("iu_xray", (r for _, r in reports), threshold=1)
    for findings, report in reports:
        assert read_findings(report) == findings, report
        generated = tokenizer.decode(tokenizer.encode(report)[1:])  # what evaluate's records hold
        assert read_findings(generated) == findings, generated


def test_unknown_sentences_state_nothing_and_the_first_mention_decides() -> None:
    assert read_findings("") == Findings()
    assert read_findings("the heart is big . lungs are clear the heart is enlarged .") == Findings()
    text = "there is cardiomegaly . the heart is normal in size . a small bilateral pleural effusion ."
    assert read_findings(text) == Findings(heart="enlarged")  # the last sentence is no phrase of the set
    assert read_findings("there is a large bilateral pleural effusion . there is a pneumothorax .") == Findings(
        effusion="large", pneumothorax="present")


def _report(**findings: str) -> str:
    return write_report(Findings(**findings), np.random.default_rng(0))


def test_scores_by_hand() -> None:
    truths = [Findings(heart="enlarged"), Findings(heart="enlarged", device="pacemaker"), Findings(), Findings()]
    reports = [_report(heart="enlarged"), _report(), _report(device="pacemaker"), _report()]
    scores = findings_scores(truths, reports)
    assert set(scores) == set(FINDINGS_KEYS)
    # heart: right, wrong, right, right; device: right, wrong, wrong, right; the rest always right.
    assert scores["findings_acc_heart"] == 3 / 4 and scores["findings_acc_device"] == 2 / 4
    assert scores["findings_acc_effusion"] == scores["findings_acc_opacity"] == 1.0
    assert scores["findings_exact_match"] == 2 / 4  # studies 0 and 3
    # enlarged heart: tp 1, fn 1 -> F1 2/3; pacemaker: tp 0, fp 1, fn 1 -> 0; the other six abnormal
    # values are neither true nor stated anywhere and are left out.
    assert scores["findings_macro_f1"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-15)


def test_a_constant_normal_report_scores_zero_f1_and_the_share_of_normal_studies_as_exact_match() -> None:
    rng = np.random.default_rng(5)
    truths = [ALL[int(i)] for i in rng.integers(0, len(ALL), 200)] + [Findings()] * 50
    scores = findings_scores(truths, [_report()] * len(truths))
    assert scores["findings_macro_f1"] == 0.0
    assert scores["findings_exact_match"] == sum(t == Findings() for t in truths) / len(truths)
    perfect = findings_scores(truths, [_report(**t.as_dict()) for t in truths])
    assert perfect["findings_macro_f1"] == perfect["findings_exact_match"] == 1.0
    assert len(ABNORMAL) == 8


def test_annotation_findings_are_read_only_when_they_are_the_sets_labels(small_set: Path) -> None:
    ann = load_annotation(small_set)
    assert all(isinstance(s.findings, Findings) for split in ann.splits.values() for s in split)
    assert synth_findings({"heart": "enlarged"}) is None  # not all five
    assert synth_findings({**Findings().as_dict(), "heart": "huge"}) is None
    assert synth_findings("no acute disease") is None  # a free-text field of that name elsewhere
    assert labelled([Findings(), None]) is None and labelled([]) is None


def test_user_data_without_labels_gets_no_findings_keys() -> None:
    studies = [Study("a", "the heart is enlarged .", ()), Study("b", "no pneumothorax .", ())]
    records = [{"id": "a", "generated": "the heart is enlarged ."}, {"id": "b", "generated": ""}]
    assert split_findings_scores(studies, records) == {}
    labelled_studies = [Study("a", "", (), Findings(heart="enlarged")), Study("b", "", (), Findings())]
    assert split_findings_scores(labelled_studies, records)["findings_exact_match"] == 1.0
