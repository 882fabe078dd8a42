"""The embedded synthetic set's findings and report text (r2gen.data.synth publishes the set).

Each study's report is a deterministic function of a few discrete findings (`Findings`, drawn by
`sample_findings` from P_NORMAL and PRIORS) plus a choice among two phrasings per sentence, the
first preferred for the sentences of normal studies, like a house style (`write_report`). Reports
never say "left" or "right": R2Gen's flip augmentation would make such words contradict the image,
so findings that have a side are reported side-free and effusions are drawn bilateral.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# --------------------------------------------------------------------------- findings

# Probability that a study is fully normal (IU X-Ray has roughly 40 % normal studies).
P_NORMAL = 0.38
# Per-finding priors used for the abnormal studies. Findings are drawn independently
# (rejecting the all-normal draw) so that no finding can be predicted from another
# one: the model has to read each from its own pixels.
PRIORS: dict[str, dict[str, float]] = {
    "heart": {"normal": 0.68, "enlarged": 0.32},
    "effusion": {"none": 0.64, "small": 0.19, "large": 0.17},
    "opacity": {"none": 0.64, "upper": 0.16, "lower": 0.20},
    "pneumothorax": {"absent": 0.88, "present": 0.12},
    "device": {"none": 0.72, "pacemaker": 0.14, "sternotomy": 0.14},
}


@dataclass(frozen=True)
class Findings:
    """The discrete labels of one study; the report and both images derive from them."""

    heart: str = "normal"  # normal | enlarged
    effusion: str = "none"  # none | small | large   (always bilateral)
    opacity: str = "none"  # none | upper | lower   (zone, never side)
    pneumothorax: str = "absent"  # absent | present
    device: str = "none"  # none | pacemaker | sternotomy

    @property
    def normal(self) -> bool:
        return self == Findings()

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def synth_findings(value: object) -> Findings | None:
    """An annotation entry's `findings` field as Findings when it holds exactly this set's labels
    (each finding one of its values), else None: other data sets' fields of that name mean other things."""
    if not isinstance(value, dict) or set(value) != set(PRIORS):
        return None
    if not all(isinstance(v, str) and v in PRIORS[k] for k, v in value.items()):
        return None
    return Findings(**value)


def _choice(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    return keys[int(rng.choice(len(keys), p=np.array(list(table.values()))))]


def sample_findings(rng: np.random.Generator) -> Findings:
    """Draw one study's findings: P_NORMAL fully normal, else independent PRIORS."""
    if rng.random() < P_NORMAL:
        return Findings()
    while True:
        f = Findings(**{name: _choice(rng, table) for name, table in PRIORS.items()})
        # A large effusion fills the lower zone, so a lower-zone opacity under it
        # would be invisible: that combination would teach the model to hallucinate.
        if f.effusion == "large" and f.opacity == "lower":
            continue
        if not f.normal:
            return f


# --------------------------------------------------------------------------- reports

# Two phrasings per sentence: enough variety to look like free text, few enough
# that every word is frequent (R2Gen drops words seen < 3 times in train).
# The sentences of normal studies, which appear in most reports, use the first
# phrasing as a "house style" with probability HOUSE_STYLE, as radiologists
# reuse templates: the phrasing noise a model cannot predict from the image then
# stays small, so BLEU has room to rise well above a constant report.
HOUSE_STYLE = 0.75
_HEART = {
    "normal": ("The heart is normal in size.", "Heart size is normal."),
    "enlarged": ("The heart is enlarged.", "There is cardiomegaly."),
}
_MEDIASTINUM = ("The mediastinum is unremarkable.", "The mediastinal contours are normal.")
_LUNGS_CLEAR = ("The lungs are clear.", "The lungs are clear without focal airspace disease.")
# "The lungs are clear" would contradict an effusion, so those studies say this instead.
_NO_OPACITY = ("There is no focal airspace opacity.", "No focal consolidation.")
_OPACITY = (
    "There is focal airspace opacity in the {zone} lung zone.",
    "Focal consolidation is present in the {zone} lung zone.",
)
_PLEURA_NORMAL = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.")
_NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.")
_EFFUSION = (
    "There is a {size} bilateral pleural effusion.",
    "{Size} bilateral pleural effusions are present.",
)
_NO_PNEUMOTHORAX = ("No pneumothorax.", "There is no pneumothorax.")
_PNEUMOTHORAX = ("There is a pneumothorax.", "A pneumothorax is present.")
_DEVICE = {
    "pacemaker": ("A pacemaker is in place.", "There is a pacemaker in place."),
    "sternotomy": ("Median sternotomy wires are present.", "There are median sternotomy wires."),
}


def _pick(rng: np.random.Generator, options: tuple[str, ...], first: float | None = None) -> str:
    """options[0] with probability `first` (default: uniform), else one of the others."""
    first = 1.0 / len(options) if first is None else first
    u = rng.random()
    if u < first or len(options) == 1:
        return options[0]
    return options[1 + min(int((u - first) / (1.0 - first) * (len(options) - 1)), len(options) - 2)]


def write_report(findings: Findings, rng: np.random.Generator) -> str:
    """IU-X-Ray-style report; sentence order fixed: heart, mediastinum, lungs, pleura, device."""
    f = findings
    house = HOUSE_STYLE
    out = [_pick(rng, _HEART[f.heart], house if f.heart == "normal" else None),
           _pick(rng, _MEDIASTINUM, house)]
    if f.opacity != "none":
        out.append(_pick(rng, _OPACITY).format(zone=f.opacity))
    elif f.effusion == "none":
        out.append(_pick(rng, _LUNGS_CLEAR, house))
    else:
        out.append(_pick(rng, _NO_OPACITY))
    if f.effusion == "none" and f.pneumothorax == "absent":
        out.append(_pick(rng, _PLEURA_NORMAL, house))
    else:
        if f.effusion == "none":
            out.append(_pick(rng, _NO_EFFUSION))
        else:
            out.append(_pick(rng, _EFFUSION).format(size=f.effusion, Size=f.effusion.capitalize()))
        out.append(_pick(rng, _PNEUMOTHORAX if f.pneumothorax == "present" else _NO_PNEUMOTHORAX))
    if f.device != "none":
        out.append(_pick(rng, _DEVICE[f.device]))
    return " ".join(out)


def report_vocabulary() -> set[str]:
    """Every lower-case word any report can contain (for tests and docs)."""
    texts: list[str] = [*_MEDIASTINUM, *_LUNGS_CLEAR, *_NO_OPACITY, *_PLEURA_NORMAL, *_NO_EFFUSION,
                        *_NO_PNEUMOTHORAX, *_PNEUMOTHORAX]
    texts += [s for v in _HEART.values() for s in v] + [s for v in _DEVICE.values() for s in v]
    texts += [s.format(zone=z) for s in _OPACITY for z in ("upper", "lower")]
    texts += [s.format(size=z, Size=z.capitalize()) for s in _EFFUSION for z in ("small", "large")]
    return {w.strip(".").lower() for t in texts for w in t.split()}
