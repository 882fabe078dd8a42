"""Clinical accuracy of generated reports on the embedded synthetic set: which findings a report states.

The synthetic set (r2gen.data.synth_reports) writes every report from a few discrete findings with its own
phrase tables, and stores the findings in annotation.json. Reading a generated report back with the
same tables is exact: every sentence the set can write maps to the findings it states, so a report
is labelled without the guesswork of a free-text labeller (CheXpert, CheXbert) on real data.

A report is read sentence by sentence (the tokenizer's " . " separators). A sentence the tables do
not know (a model's mix of two phrasings) states nothing; the first sentence that states a finding
decides it; a finding no sentence states takes its normal value (not mentioned = not present, as
radiology labellers read a report). Scores over a split:
- `findings_acc_<name>`: the share of studies whose value of that finding is right;
- `findings_exact_match`: the share with all five right;
- `findings_macro_f1`: the mean over the abnormal values (enlarged heart, small and large effusion,
  upper and lower opacity, pneumothorax, pacemaker, sternotomy) of the one-vs-rest F1; a value
  neither true of nor stated for any study of the split is left out of the mean. A report that
  states only normal findings (the constant-report baseline) scores 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import fields

from r2gen.data import synth_reports
from r2gen.data.synth_reports import Findings
from r2gen.data.tokenizer import clean_report_iu_xray

FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Findings))
ABNORMAL: tuple[tuple[str, str], ...] = tuple(
    (name, value) for name, table in synth_reports.PRIORS.items() for value in table if value != getattr(Findings(), name))
"""(finding, value) of every abnormal value, the classes of the macro F1."""
FINDINGS_KEYS: tuple[str, ...] = ("findings_macro_f1", "findings_exact_match",
                                  *(f"findings_acc_{name}" for name in FINDING_NAMES))
"""The score keys findings_scores returns (after the split's prefix in metrics.jsonl: val/findings_macro_f1)."""


def _clean(sentence: str) -> str:
    return clean_report_iu_xray(sentence).removesuffix(" .").strip()


def _sentence_table() -> dict[str, dict[str, str]]:
    """Every sentence the set writes, cleaned as the tokenizer cleans it -> the findings it states."""
    table: dict[str, dict[str, str]] = {}

    def add(sentences: Sequence[str], **stated: str) -> None:
        for s in sentences:
            table[_clean(s)] = stated

    for value, sentences in synth_reports._HEART.items():
        add(sentences, heart=value)
    add(synth_reports._LUNGS_CLEAR, opacity="none")
    add(synth_reports._NO_OPACITY, opacity="none")
    for zone in ("upper", "lower"):
        add([s.format(zone=zone) for s in synth_reports._OPACITY], opacity=zone)
    add(synth_reports._PLEURA_NORMAL, effusion="none", pneumothorax="absent")
    add(synth_reports._NO_EFFUSION, effusion="none")
    for size in ("small", "large"):
        add([s.format(size=size, Size=size.capitalize()) for s in synth_reports._EFFUSION], effusion=size)
    add(synth_reports._NO_PNEUMOTHORAX, pneumothorax="absent")
    add(synth_reports._PNEUMOTHORAX, pneumothorax="present")
    for device, sentences in synth_reports._DEVICE.items():
        add(sentences, device=device)
    return table


_SENTENCES = _sentence_table()


def read_findings(report: str) -> Findings:
    """The findings a report states, read with the synthetic set's own phrase tables (raw or
    tokenized text: both are cleaned the tokenizer's way first)."""
    stated: dict[str, str] = {}
    for sentence in clean_report_iu_xray(report).split(" . "):
        for name, value in _SENTENCES.get(sentence.removesuffix(" .").strip(), {}).items():
            stated.setdefault(name, value)
    return Findings(**stated)


def speaks_synthetic(vocabulary: Iterable[str]) -> bool:
    """Whether a model with this vocabulary writes the synthetic set's reports (every word one its phrase
    tables use: trained on the embedded set or a `data synth` one), so that read_findings means something;
    on other data every report would read as normal, which is no finding."""
    words = set(vocabulary) - {".", "<unk>"}
    return bool(words) and words <= synth_reports.report_vocabulary()


def labelled(findings: Sequence[Findings | None]) -> list[Findings] | None:
    """The split's findings when every study has the set's labels (Study.findings), else None: user
    data gets no findings scores at all, rather than zeros."""
    return None if not findings or any(f is None for f in findings) else list(findings)


def findings_scores(truths: Sequence[Findings], reports: Sequence[str]) -> dict[str, float | None]:
    """Per-finding accuracy, exact match and macro F1 of `reports` against the true findings."""
    if len(truths) != len(reports):
        raise ValueError(f"{len(truths)} studies but {len(reports)} reports")
    if not truths:
        return {key: None for key in FINDINGS_KEYS}
    read = [read_findings(r) for r in reports]
    n = len(truths)
    scores: dict[str, float | None] = {
        f"findings_acc_{name}": sum(getattr(t, name) == getattr(p, name) for t, p in zip(truths, read)) / n
        for name in FINDING_NAMES}
    scores["findings_exact_match"] = sum(t == p for t, p in zip(truths, read)) / n
    f1s = []
    for name, value in ABNORMAL:
        tp = sum(getattr(t, name) == value and getattr(p, name) == value for t, p in zip(truths, read))
        fp = sum(getattr(t, name) != value and getattr(p, name) == value for t, p in zip(truths, read))
        fn = sum(getattr(t, name) == value and getattr(p, name) != value for t, p in zip(truths, read))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    scores["findings_macro_f1"] = sum(f1s) / len(f1s) if f1s else None
    return {key: scores[key] for key in FINDINGS_KEYS}
