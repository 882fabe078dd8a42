"""r2gen.scores against hand-computed values, on the real pycocoevalcap scorers.

Every compute_scores call with Java present starts a METEOR JVM (about 9 s on 2 cores), so the
cases are grouped to keep the number of calls small.
"""

from __future__ import annotations

import math
import os
import warnings

import psutil
import pytest

from r2gen import scores
from r2gen.scores import SCORE_KEYS, MeteorUnavailableWarning, compute_scores

needs_java = pytest.mark.skipif(not scores.java_available(), reason="METEOR needs a Java runtime")


@pytest.fixture(scope="module", autouse=True)
def machine_path(path_without_java: str):
    """This module tests METEOR: the machine's own PATH, with its java (conftest.py hides it elsewhere)."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = path_without_java
    scores.java_available.cache_clear()
    yield
    os.environ["PATH"] = saved
    scores.java_available.cache_clear()

REPORTS = [
    "the heart size is normal .",
    "no pleural effusion or pneumothorax .",
    "the lungs are clear bilaterally .",
    "mild degenerative changes of the thoracic spine .",
]


@pytest.fixture(autouse=True)
def fresh_meteor_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # The warn-once and broken flags are per process; each test starts from a clean process state.
    monkeypatch.setattr(scores._MeteorState, "warned", False)
    monkeypatch.setattr(scores._MeteorState, "broken", None)


@pytest.fixture(scope="module")
def identical_scores() -> dict[str, float | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeteorUnavailableWarning)
        return compute_scores(REPORTS, list(REPORTS))


def test_identical_pairs_score_one(identical_scores: dict[str, float | None]) -> None:
    assert tuple(identical_scores) == SCORE_KEYS
    for n in range(1, 5):  # pycocoevalcap's smoothing, (correct + 1e-15) / (guess + 1e-9), is ~1e-10 below 1
        assert identical_scores[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert identical_scores["ROUGE_L"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for k, v in identical_scores.items() if k != "METEOR")


@needs_java
def test_identical_pairs_meteor_close_to_one(identical_scores: dict[str, float | None]) -> None:
    assert identical_scores["METEOR"] is not None
    assert identical_scores["METEOR"] > 0.95


def _jvms() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "java" in p.name().lower()]


@needs_java
def test_meteor_jvm_is_kept_for_later_evaluations_then_reaped(identical_scores: dict[str, float | None]) -> None:
    import time

    assert identical_scores["METEOR"] is not None
    (jvm,) = _jvms()  # the fixture's evaluation left one JVM running, on purpose
    start = time.perf_counter()
    again = compute_scores(REPORTS, list(REPORTS))
    assert time.perf_counter() - start < 5  # no second JVM start and paraphrase-table load (about 9 s)
    assert again == identical_scores and [p.pid for p in _jvms()] == [jvm.pid]
    scores.close_meteor()
    assert not _jvms()  # gone, zombie included
    assert compute_scores(REPORTS, list(REPORTS)) == identical_scores  # a fresh JVM scores the same


@needs_java
def test_meteor_timeout_kills_jvm(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real JVM that cannot finish in time (loading the paraphrase table alone takes seconds).
    scores.close_meteor()  # a JVM that must start (and load its table) within the limit
    monkeypatch.setattr(scores, "METEOR_TIMEOUT_S", 0.2)
    with pytest.warns(MeteorUnavailableWarning, match="longer than 0.2 s"):
        s = compute_scores(["no acute disease"], ["no acute disease"])
    assert s["METEOR"] is None and s["BLEU_1"] == pytest.approx(1.0)
    assert not _jvms()


def test_cider_identical_corpus_positive(identical_scores: dict[str, float | None]) -> None:
    # CIDEr's idf is log(N / df) over the references of the scored corpus: with 4 different reports,
    # n-grams unique to one report weigh log(4), so identical hypotheses score > 0. Only "." (in
    # every report) gets idf 0.
    assert identical_scores["CIDEr"] > 1.0


def test_bleu_and_rouge_by_hand() -> None:
    refs = ["the heart size is normal", "no pleural effusion"]
    hyps = ["the heart is normal", "no effusion effusion"]
    s = compute_scores(refs, hyps)

    # BLEU, corpus level: clipped n-gram matches and lengths are summed over the corpus first.
    # pair 1: unigrams the/heart/is/normal all in the reference -> 4 of 4;
    #         bigrams "the heart" yes, "heart is" no, "is normal" yes -> 2 of 3; lengths 4 vs 5.
    # pair 2: unigrams no (1) + effusion (2 in hyp, clipped to its 1 in the ref) -> 2 of 3;
    #         bigrams "no effusion", "effusion effusion" -> 0 of 2; lengths 3 vs 3.
    # corpus: p1 = 6/7, p2 = 2/5, hyp length 7 < ref length 8 -> BP = exp(1 - 8/7).
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's smoothing: (correct + tiny) / (guess + small)
    p1 = (6 + tiny) / (7 + small)
    p2 = (2 + tiny) / (5 + small)
    ratio = (7 + tiny) / (8 + small)
    bp = math.exp(1 - 1 / ratio)
    assert s["BLEU_1"] == pytest.approx(p1 * bp, abs=1e-9)
    assert s["BLEU_2"] == pytest.approx(math.sqrt(p1 * p2) * bp, abs=1e-9)
    # The smoothing is invisible at 1e-6: the textbook values.
    assert s["BLEU_1"] == pytest.approx(6 / 7 * math.exp(-1 / 7), abs=1e-6)
    assert s["BLEU_2"] == pytest.approx(math.sqrt(6 / 7 * 2 / 5) * math.exp(-1 / 7), abs=1e-6)

    # ROUGE-L, mean over reports of F = (1 + b^2) P R / (R + b^2 P), b = 1.2, P = LCS/|hyp|, R = LCS/|ref|.
    # pair 1: LCS "the heart is normal" = 4 -> P = 1, R = 4/5 -> F = 2.44 * 0.8 / (0.8 + 1.44) = 0.871428...
    # pair 2: LCS "no effusion" = 2 -> P = R = 2/3 -> F = 2/3.
    b2 = 1.2**2
    f1 = (1 + b2) * 1.0 * 0.8 / (0.8 + b2 * 1.0)
    assert f1 == pytest.approx(0.8714285714285714)
    assert s["ROUGE_L"] == pytest.approx((f1 + 2 / 3) / 2, abs=1e-9)


def test_disjoint_pairs_score_zero() -> None:
    refs = ["the heart size is normal", "no pleural effusion", "lungs are clear"]
    hyps = ["xx yy zz ww", "aa bb cc dd", "ee ff gg hh"]
    s = compute_scores(refs, hyps)
    assert s["BLEU_4"] == pytest.approx(0.0, abs=1e-6)
    assert s["BLEU_1"] == pytest.approx(0.0, abs=1e-6)
    assert s["ROUGE_L"] == 0.0
    assert s["CIDEr"] == pytest.approx(0.0, abs=1e-9)
    if s["METEOR"] is not None:
        assert s["METEOR"] == pytest.approx(0.0, abs=1e-6)


def test_cider_ranks_closer_hypothesis_higher() -> None:
    close = ["the heart size is normal .", "no pleural effusion or pneumothorax .",
             "the lungs are clear .", "mild degenerative changes of the spine ."]
    far = ["the heart is enlarged .", "there is a pleural effusion .",
           "the lungs are hyperinflated .", "no acute osseous abnormality ."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeteorUnavailableWarning)
        s_close = compute_scores(REPORTS, close)
        s_far = compute_scores(REPORTS, far)
    assert s_close["CIDEr"] > s_far["CIDEr"] > 0.0
    assert s_close["BLEU_4"] > s_far["BLEU_4"]


def test_meteor_without_java_is_none_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one fake here: a missing system binary. The scorers themselves are real.
    monkeypatch.setattr(scores, "java_available", lambda: False)
    with pytest.warns(MeteorUnavailableWarning) as record:
        first = compute_scores(["no acute disease"], ["no acute disease"])
        second = compute_scores(["no acute disease"], ["no disease"])
    assert first["METEOR"] is None and second["METEOR"] is None
    assert first["BLEU_1"] == pytest.approx(1.0)
    assert len([w for w in record if issubclass(w.category, MeteorUnavailableWarning)]) == 1


def test_java_available_false_on_empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    scores.java_available.cache_clear()
    try:
        assert scores.java_available() is False
    finally:
        # Forget the False; the next call re-checks after monkeypatch has restored PATH.
        scores.java_available.cache_clear()


def test_meteor_failing_at_runtime_is_none_and_warns_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # java_available() said yes, then `java` cannot be started: the runtime guard, not the pre-check.
    scores.close_meteor()
    monkeypatch.setattr(scores, "java_available", lambda: True)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(MeteorUnavailableWarning) as record:
        first = compute_scores(["no acute disease"], ["no acute disease"])
        second = compute_scores(["no acute disease"], ["no acute disease"])
    assert first["METEOR"] is None and second["METEOR"] is None
    assert first["ROUGE_L"] == pytest.approx(1.0)
    assert len([w for w in record if issubclass(w.category, MeteorUnavailableWarning)]) == 1
    assert "subprocess failed" in str(record[0].message)


def test_mismatched_or_empty_inputs_raise() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        compute_scores(["a b", "c d"], ["a b"])
    with pytest.raises(ValueError, match="empty"):
        compute_scores([], [])
    with pytest.raises(TypeError):
        compute_scores("a b", "a b")


def test_empty_hypothesis_and_line_breaks_do_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    # An empty hypothesis is what decode gives when the model emits 0 first; a newline would
    # desynchronise METEOR's line protocol if it reached the JVM.
    refs = ["no acute cardiopulmonary abnormality", "the lungs are clear"]
    hyps = ["no acute\ncardiopulmonary abnormality", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeteorUnavailableWarning)
        s = compute_scores(refs, hyps)
    assert tuple(s) == SCORE_KEYS
    for key, value in s.items():
        if key == "METEOR" and value is None:
            continue
        assert value is not None and math.isfinite(value) and value >= 0.0
    # Per-report ROUGE-L is 1 (line break read as a space) and 0 (empty hypothesis).
    assert s["ROUGE_L"] == pytest.approx(0.5)
    if scores.java_available():
        assert s["METEOR"] is not None and 0.3 < s["METEOR"] < 1.0
    assert capsys.readouterr().out == ""  # Bleu's verbose counts stay off stdout
