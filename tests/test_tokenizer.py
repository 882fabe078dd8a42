"""R2Gen's cleaning rules and vocabulary, checked against hand-worked examples."""

from __future__ import annotations

import pytest

from r2gen.data.tokenizer import Tokenizer, clean_report_iu_xray, clean_report_mimic_cxr

IU_CASES = [
    ("The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
     "the heart is normal in size . the mediastinum is unremarkable . the lungs are clear ."),
    # enumerations dropped, repeated periods collapsed, the final period stripped by the regex
    ("1. No acute cardiopulmonary abnormality. 2. Stable XXXX opacity in the right lung base..",
     "no acute cardiopulmonary abnormality . stable xxxx opacity in the right lung base ."),
    # the published character class also removes < = > @ (it holds the range ':' to '['),
    # keeps hyphens and digits, and quotes and slashes vanish without a space
    ('Heart size normal.. No effusion (small?) <3cm @ x=5; T-spine: "mild" degenerative/changes.',
     "heart size normal . no effusion small 3cm  x5 t-spine mild degenerativechanges ."),
    # empty sentences are kept, as published
    ("Findings: 1. heart.  2. lungs. ", "findings heart .  . lungs ."),
]


@pytest.mark.parametrize("raw,clean", IU_CASES)
def test_iu_xray_cleaning(raw, clean):
    assert clean_report_iu_xray(raw) == clean


def test_mimic_cleaning_handles_newlines_underscores_and_double_spaces():
    raw = "FINDINGS:\n\nThe  lungs are __ clear...  1. No effusion. 2. Heart ok."
    assert clean_report_mimic_cxr(raw) == "findings the lungs are  clear . no effusion . heart ok ."


def test_vocabulary_threshold_sorted_ids_and_unk():
    reports = ["A b c.", "A b.", "A c. D."]
    tok = Tokenizer.from_reports("iu_xray", reports, threshold=2)
    # counts: a 3, b 2, c 2, '.' 4, d 1 -> d below threshold
    assert tok.token2idx == {".": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}
    assert tok.encode("A d b.") == [0, 3, 2, 4, 1, 0]
    assert tok.decode([3, 4, 1, 0, 5]) == "a b ."
    assert tok.decode_batch([[3, 0], [0, 3]]) == ["a", ""]


def test_default_thresholds_are_the_published_ones():
    reports = ["x."] * 9 + ["y."] * 10
    assert "x" not in Tokenizer.from_reports("mimic_cxr", reports).token2idx
    assert "y" in Tokenizer.from_reports("mimic_cxr", reports).token2idx
    assert "x" in Tokenizer.from_reports("iu_xray", ["x."] * 3).token2idx


def test_json_round_trip():
    tok = Tokenizer.from_reports("iu_xray", ["the heart is normal."] * 3)
    again = Tokenizer.from_json(tok.to_json())
    assert again.token2idx == tok.token2idx and again.dataset == "iu_xray"
    assert again.encode("the heart") == tok.encode("the heart")


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match="unknown"):
        Tokenizer.from_reports("chexpert", ["a."])
