"""Embedded synthetic chest X-ray data set in IU X-Ray format (the launcher's default data).

This module owns everything about the built-in data set: sampling the findings of
each study, drawing a frontal (PA) and a lateral grayscale radiograph that really
show those findings, writing an IU-X-Ray-style report that describes them, and
publishing the whole set (``annotation.json`` + ``images/``) atomically on disk.

The point of the set is to give R2Gen something learnable to train on when no real
data is at hand: the reports are a deterministic function of a few discrete
findings (plus a choice among 2 phrasings per sentence, the first one preferred for
the sentences of normal studies, like a house style), and every finding is drawn
large and bright enough to survive R2Gen's train transform (resize to 64-256 px,
random crop of ~87 %, horizontal flip). Reports never say "left"/"right" because
the flip augmentation would make such words contradict the image; findings that
have a side (opacity, pneumothorax, pacemaker) are reported side-free, effusions
are drawn bilateral.

Everything is deterministic: study ``i`` draws its findings/report from
``np.random.default_rng([seed, i, 0])`` and its pixels from
``np.random.default_rng([seed, i, 1])``, so the same ``(studies, seed,
image_size)`` gives byte-identical files, and ``annotation.json`` does not even
depend on ``image_size``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from r2gen.atomic import write_dir_atomically

__all__ = [
    "Findings",
    "synth_findings",
    "sample_findings",
    "write_report",
    "render_frontal",
    "render_lateral",
    "synthesize",
    "default_dataset",
    "plan_studies",
    "cache_root",
    "report_vocabulary",
    "DATASET_VERSION",
    "MIN_STUDIES",
]

# Bump when the rendering or the reports change, so stale caches are not reused.
DATASET_VERSION = 2
# With fewer studies the 70/10/20 split degenerates (val/test of a single study
# and a train split too small to hold every report word).
MIN_STUDIES = 10
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train / val / test, as IU X-Ray's 2069/296/590

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
    """An annotation entry's ``findings`` field as Findings when it holds exactly this set's labels
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
    """options[0] with probability ``first`` (default: uniform), else one of the others."""
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


# --------------------------------------------------------------------------- rendering
#
# Images are composed in float32 "attenuation" units in [0, 1] (0 = air, black) on
# a resolution-independent body frame (u, v): u = 0 on the body midline, about
# +-0.45 at the skin, v = 0 at the top of the film and 1 at the bottom. A random
# shift/scale per view maps (u, v) to pixels, so studies are not pixel-aligned.
# Edges are soft ramps ~1.5 px wide, which anti-aliases at every image size.
#
# Speed (400 studies x 2 views in a few seconds on one core) comes from two
# habits: every structure is computed only inside its bounding box (_Frame.crop),
# and anything separable is built from 1-D rows/columns combined by broadcasting
# (Gaussians are outer products, ribs use the angle-sum identity).


@dataclass(frozen=True)
class _Frame:
    """Body-frame coordinates of the pixels of one view, or of a box cut out of it."""

    u: np.ndarray  # (1, W) body-frame x of each pixel column in this box
    v: np.ndarray  # (H, 1) body-frame y of each pixel row in this box
    px: float  # one pixel in body-frame units
    size: int
    dx: float
    dy: float
    scale: float
    u_full: np.ndarray
    v_full: np.ndarray
    sl: tuple[slice, slice] = (slice(None), slice(None))

    def to_pixels(self, u: float, v: float, k: int = 1) -> tuple[float, float]:
        """Body-frame point -> pixel coordinates on a canvas k times the image size."""
        x = (u * self.scale + 0.5 + self.dx) * self.size * k
        y = ((v - 0.5) * self.scale + 0.5 + self.dy) * self.size * k
        return x, y

    def crop(self, u0: float, u1: float, v0: float, v1: float) -> "_Frame":
        """The pixels covering the body-frame box [u0, u1] x [v0, v1] (clamped to the image)."""
        x0, y0 = self.to_pixels(u0, v0)
        x1, y1 = self.to_pixels(u1, v1)
        c0, c1 = min(max(0, int(np.floor(x0))), self.size), min(max(0, int(np.ceil(x1))), self.size)
        r0, r1 = min(max(0, int(np.floor(y0))), self.size), min(max(0, int(np.ceil(y1))), self.size)
        return replace(self, u=self.u_full[:, c0:c1], v=self.v_full[r0:r1], sl=(slice(r0, r1), slice(c0, c1)))


def _frame(rng: np.random.Generator, size: int) -> _Frame:
    # Patient positioning varies a little: a few percent shift, up to 10 % magnification.
    dx, dy = (float(t) for t in rng.uniform(-0.025, 0.025, 2))
    scale = float(rng.uniform(0.90, 1.0))
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = ((c - 0.5 - dx) / scale)[None, :]
    v = ((c - 0.5 - dy) / scale + 0.5)[:, None]
    return _Frame(u, v, 1.0 / (size * scale), size, dx, dy, scale, u, v)


def _ramp(t: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 as the signed distance t goes from -width/2 to +width/2."""
    return np.clip(t * (1.0 / width) + 0.5, 0.0, 1.0)


def _paint(img: np.ndarray, w: _Frame, value: np.ndarray | float, mask: np.ndarray) -> None:
    """In place: blend value into img inside box w with opacity mask."""
    sub = img[w.sl]
    sub += (value - sub) * mask


def _add(img: np.ndarray, w: _Frame, delta: np.ndarray) -> None:
    img[w.sl] += delta


def _ellipse(w: _Frame, cu: float, cv: float, ru: float, rv: float, soft: float = 2.0) -> np.ndarray:
    """Soft filled ellipse inside box w; the edge ramp is ``soft`` pixels wide."""
    d = np.sqrt(((w.u - cu) / ru) ** 2 + ((w.v - cv) / rv) ** 2)
    return _ramp((1.0 - d) * min(ru, rv), soft * w.px)


def _gaussian(w: _Frame, cu: float, cv: float, sigma: float) -> np.ndarray:
    # Separable: an outer product of two 1-D Gaussians instead of a 2-D exp.
    k = -0.5 / (sigma * sigma)
    return np.exp(k * (w.v - cv) ** 2) * np.exp(k * (w.u - cu) ** 2)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean low-frequency noise: a cells x cells random grid, bicubically upsampled."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _blob(w: _Frame, rng: np.random.Generator, cu: float, cv: float, r: float) -> np.ndarray:
    """Irregular consolidation: three overlapping Gaussians, peak ~1."""
    out = None
    for _ in range(3):
        ou, ov = rng.uniform(-0.5, 0.5, 2) * r
        g = _gaussian(w, cu + ou, cv + ov, r * rng.uniform(0.45, 0.65))
        out = g if out is None else np.maximum(out, g)
    return out


def _finish(img: np.ndarray, fr: _Frame, rng: np.random.Generator) -> np.ndarray:
    """Exposure gradient, quantum noise and a random exposure curve, to 8 bit."""
    # Uneven exposure (anode heel effect): a smooth gradient, built from 1-D pieces.
    gu, gv, cv = rng.uniform(-0.03, 0.03, 3)
    img += gv * (fr.v - 0.5) + cv * (fr.v - 0.5) ** 2
    img += gu * fr.u
    # Quantum noise; uniform rather than Gaussian because it is 3x cheaper to draw
    # and looks the same at this amplitude.
    sigma = rng.uniform(0.01, 0.02) * np.sqrt(12.0)
    img += sigma * (rng.random(img.shape, dtype=np.float32) - 0.5)
    # Exposure/contrast variation as a 1024-entry lookup table: a gamma curve costs
    # one pow per entry instead of one per pixel.
    gamma, gain, offset = rng.uniform(0.85, 1.15), rng.uniform(0.9, 1.08), rng.uniform(-0.02, 0.03)
    lut = gain * np.linspace(0.0, 1.0, 1024) ** gamma + offset
    lut = (np.clip(lut, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    np.clip(img, 0.0, 1.0, out=img)
    img *= 1023.0
    img += 0.5
    return np.take(lut, img.astype(np.uint16))


def _device_layer(fr: _Frame, draw_fn: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """Metal drawn with PIL at 2x then box-downsampled, i.e. anti-aliased, in [0, 1]."""
    k = 2
    layer = Image.new("L", (fr.size * k, fr.size * k), 0)
    draw_fn(ImageDraw.Draw(layer), k)
    layer = layer.resize((fr.size, fr.size), Image.Resampling.BOX)
    return np.asarray(layer, dtype=np.float32) * (1.0 / 255.0)


def _bezier(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float],
            n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t ** 2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def _pacemaker(fr: _Frame, rng: np.random.Generator, gen_uv: tuple[float, float],
               lead_ends: Iterable[tuple[float, float]], gen_wh: tuple[float, float]) -> np.ndarray:
    """Generator can plus leads running to the heart, as a [0, 1] layer."""
    wire = max(2, round(fr.size / 40))  # width on the 2x canvas: >= 1 px after downsampling
    bends = [(0.02 + rng.uniform(-0.03, 0.03), gen_uv[1] + 0.05) for _ in lead_ends]

    def draw(d: ImageDraw.ImageDraw, k: int) -> None:
        gx, gy = fr.to_pixels(*gen_uv, k)
        for end, bend in zip(lead_ends, bends):
            # Leads loop down through the superior vena cava: a bent curve, not a chord.
            pts = _bezier((gx, gy), fr.to_pixels(*bend, k), fr.to_pixels(*end, k))
            d.line(pts, fill=215, width=wire, joint="curve")
        w, h = (t * fr.scale * fr.size * k / 2 for t in gen_wh)
        d.rounded_rectangle((gx - w, gy - h, gx + w, gy + h), radius=min(w, h) * 0.6, fill=250)

    return _device_layer(fr, draw)


def _sternotomy(fr: _Frame, rng: np.random.Generator, cu: float, v0: float, v1: float,
                ru: float, rv: float) -> np.ndarray:
    """5-6 twisted wire loops stacked along the sternum, as a [0, 1] layer."""
    n = int(rng.integers(5, 7))
    jitter = rng.uniform(-0.008, 0.008, n)
    wire = max(2, round(fr.size / 24))

    def draw(d: ImageDraw.ImageDraw, k: int) -> None:
        a, b = ru * fr.scale * fr.size * k, rv * fr.scale * fr.size * k
        for vv, ju in zip(np.linspace(v0, v1, n), jitter):
            x, y = fr.to_pixels(cu + float(ju), float(vv), k)
            d.ellipse((x - a, y - b, x + a, y + b), outline=245, width=wire)
            d.line(((x, y - b), (x, y + b)), fill=245, width=wire)  # the twisted knot

    return _device_layer(fr, draw)


@dataclass(frozen=True)
class _Lung:
    side: int  # -1 image left (patient right), +1 image right
    c: float  # centre u
    w: _Frame  # bounding box
    shape: np.ndarray  # outline without the diaphragm (fluid may fill it)
    lung: np.ndarray  # aerated lung: outline cut by the dome
    floor: np.ndarray  # how far down fluid may reach: a little below the dome


def _lung_outline(w: _Frame, c: float, top: float, half_w: float, px: float) -> np.ndarray:
    """Parabolic apex, widest low: half width grows like sqrt of the depth below the apex."""
    t = np.clip((w.v - top) / 0.62, 0.0, 1.0)
    return _ramp(half_w * np.sqrt(t) * (1.15 - 0.2 * t) - np.abs(w.u - c), 1.5 * px) \
        * _ramp(w.v - top, 1.5 * px)


def _streams(rng: np.random.Generator) -> tuple[np.random.Generator, ...]:
    """Split a view's randomness into anatomy, lesion and film streams.

    Anatomy (positioning, lung and heart geometry, textures) and film (exposure,
    noise) draw the same numbers whatever the findings are, so two renders with
    the same rng that differ in one finding differ only in that finding's pixels:
    a counterfactual pair, which is what makes the set learnable and testable.
    """
    return tuple(np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=3))


def render_frontal(findings: Findings, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """PA view, (size, size) uint8. Image right = patient left (the heart apex side)."""
    f = findings
    anat, lesion, film = _streams(rng)
    fr = _frame(anat, size)
    px = fr.px
    img = np.full((size, size), 0.03, np.float32)

    # Torso: a super-ellipse of soft tissue with soft skin edges, shoulders at the top.
    body = _ramp(1.0 - (np.abs(fr.u) / 0.46) ** 4 - (np.abs(fr.v - 0.64) / 0.66) ** 4, 0.12)
    _paint(img, fr, 0.36 + 0.06 * fr.v, body)

    # Lungs: outline cut below by a diaphragm dome per side, highest mid-lung and
    # lowest at the lateral costophrenic angle (patient's right a little higher).
    top = 0.13 + anat.uniform(-0.01, 0.01)
    lung_w = 0.16 + anat.uniform(-0.008, 0.008)
    markings = 0.028 * _smooth_noise(anat, size, 14)  # vascular markings
    lungs: list[_Lung] = []
    for side in (-1, 1):
        c = side * (0.20 + anat.uniform(-0.005, 0.005))
        w = fr.crop(c - 1.2 * lung_w, c + 1.2 * lung_w, top - 0.02, 0.9)
        shape = _lung_outline(w, c, top, lung_w, px)
        dome = 0.71 + (0.02 if side < 0 else 0.0) + anat.uniform(-0.015, 0.015) \
            + 0.075 * ((w.u - c) / lung_w) ** 2
        lung = shape * _ramp(dome - w.v, 2.0 * px) * _ramp(0.84 - w.v, 1.5 * px)
        floor = _ramp(dome + 0.05 - w.v, 3.0 * px) * _ramp(0.86 - w.v, 1.5 * px)
        hilum = 0.10 * _gaussian(w, side * 0.095, 0.455, 0.05)
        _paint(img, w, 0.12 + anat.uniform(-0.02, 0.02) + markings[w.sl] + hilum, lung)
        lungs.append(_Lung(side, c, w, shape, lung, floor))

    # Pleural effusion, bilateral: fluid fills the base of each hemithorax up to a
    # meniscus that climbs the lateral chest wall, and hides dome and angle.
    if f.effusion != "none":
        level, climb = (0.75, 0.11) if f.effusion == "small" else (0.53, 0.14)
        for L in lungs:
            # 0 at the medial edge of the lung, 1 at the chest wall.
            across = np.clip((L.side * (L.w.u - L.c) + lung_w) / (2 * lung_w), 0.0, 1.0)
            depth = L.w.v - (level + lesion.uniform(-0.012, 0.012) - climb * across ** 2)
            fluid = L.shape * L.floor * _ramp(depth, 0.02)
            _paint(img, L.w, 0.46 + 0.2 * np.clip(depth, 0.0, 0.3), fluid)

    # Pneumothorax: the lung collapses towards its hilum leaving a black, markings-free
    # rim of pleural air at the apex and lateral wall, edged by the visceral pleural line.
    if f.pneumothorax == "present":
        L = lungs[int(lesion.integers(2))]
        k = lesion.uniform(0.44, 0.5)
        hu, hv = L.c - L.side * 0.06, 0.56
        # The collapsed lung is the outline shrunk by k about (hu, hv): evaluate the
        # outline at each pixel's pre-image under that shrink.
        pre = replace(L.w, u=hu + (L.w.u - hu) / k, v=hv + (L.w.v - hv) / k)
        collapsed = _lung_outline(pre, L.c, top, lung_w, px / k)
        air = L.lung * (1.0 - collapsed)
        _paint(img, L.w, 0.035, air)
        _add(img, L.w, L.lung * collapsed * (0.05 + 0.56 * (1.0 - collapsed)))  # denser + pleural line

    # Mediastinum and spine: a bright midline column (vertebrae faintly banded),
    # the trachea a dark stripe in its upper part.
    w = fr.crop(-0.09, 0.09, -0.1, 1.1)
    med = _ramp(0.055 + 0.02 * w.v - np.abs(w.u), 2 * px) * _ramp(0.98 - w.v, 2 * px)
    sub = img[w.sl]
    np.maximum(sub, (0.50 + 0.04 * np.cos(w.v * (2 * np.pi * 14))) * med, out=sub)
    trachea = _ramp(0.016 - np.abs(w.u), 1.5 * px) * (_ramp(w.v - 0.02, 2 * px) * _ramp(0.36 - w.v, 0.04))
    sub -= 0.16 * trachea

    # Heart: cardiac silhouette bulging to the patient's left (image right) plus the
    # right-atrial border. Enlarged = ~1.5x wider (cardiothoracic ratio ~0.65 vs ~0.45).
    tu, tv = anat.random(2)  # drawn either way, so only the size class changes the anatomy
    if f.heart == "enlarged":
        hr_u, hr_v, hc_u, hc_v = 0.235 + 0.02 * tu, 0.15 + 0.015 * tv, 0.065, 0.62
    else:
        hr_u, hr_v, hc_u, hc_v = 0.155 + 0.015 * tu, 0.115 + 0.01 * tv, 0.05, 0.645
    w = fr.crop(hc_u - 1.05 * hr_u, hc_u + 1.05 * hr_u, hc_v - 1.05 * hr_v, hc_v + 1.2 * hr_v)
    heart = np.maximum(
        _ellipse(w, hc_u + 0.2 * hr_u, hc_v + 0.1 * hr_v, 0.8 * hr_u, hr_v),
        _ellipse(w, hc_u - 0.35 * hr_u, hc_v + 0.05 * hr_v, 0.62 * hr_u, 0.85 * hr_v))
    _paint(img, w, np.maximum(img[w.sl], 0.54), heart)

    # Focal opacity: an irregular bright blob inside one lung; the zone is what is
    # reported. Added after the heart because attenuations add up: a retrocardiac
    # consolidation brightens the heart shadow instead of hiding behind it.
    if f.opacity != "none":
        L = lungs[int(lesion.integers(2))]
        cu = L.c + L.side * lesion.uniform(0.0, 0.04)
        cv = lesion.uniform(0.25, 0.34) if f.opacity == "upper" else lesion.uniform(0.56, 0.64)
        blob = _blob(L.w, lesion, cu, cv, lesion.uniform(0.1, 0.115))
        _add(img, L.w, lesion.uniform(0.4, 0.46) * blob * L.shape)

    # Bones: posterior ribs as curved bands, cos(a + b) = cos a cos b - sin a sin b
    # so the 2-D cosine is two outer products of 1-D ones.
    w = fr.crop(-0.42, 0.42, 0.1, 0.83)
    au = np.abs(w.u)
    freq = 2 * np.pi * anat.uniform(9.5, 11.0)
    a, b = freq * w.v, freq * (0.25 * au - 1.4 * au ** 2)
    cos = np.cos(a) * np.cos(b) - np.sin(a) * np.sin(b)
    ribs = _ramp(cos - 0.35, 0.5) * (_ramp(0.40 - au, 0.04) * _ramp(au - 0.05, 0.02)) \
        * (_ramp(w.v - 0.12, 0.03) * _ramp(0.80 - w.v, 0.06))
    _add(img, w, 0.06 * ribs)
    w = fr.crop(-0.42, 0.42, 0.05, 0.3)
    au = np.abs(w.u)
    clavicles = _ramp(0.018 - np.abs(w.v - (0.125 - 0.06 * au + 0.18 * au ** 2)), 2 * px) \
        * (_ramp(0.38 - au, 0.03) * _ramp(au - 0.04, 0.02))
    _add(img, w, 0.16 * clavicles)

    if f.device == "pacemaker":
        s = 1 if lesion.random() < 0.5 else -1
        gen = (s * lesion.uniform(0.24, 0.29), lesion.uniform(0.17, 0.21))
        ends = [(hc_u + 0.25 * hr_u, hc_v + 0.5 * hr_v), (hc_u - 0.45 * hr_u, hc_v - 0.2 * hr_v)]
        layer = _pacemaker(fr, lesion, gen, ends[: int(lesion.integers(1, 3))], (0.17, 0.12))
        np.maximum(img, 0.97 * layer, out=img)
    elif f.device == "sternotomy":
        v0, v1 = lesion.uniform(0.24, 0.28), lesion.uniform(0.56, 0.62)
        layer = _sternotomy(fr, lesion, 0.0, v0, v1, 0.05, 0.026)
        np.maximum(img, 0.97 * layer, out=img)
    return _finish(img, fr, film)


def render_lateral(findings: Findings, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Lateral view, (size, size) uint8. The patient faces image left (anterior = -u)."""
    f = findings
    anat, lesion, film = _streams(rng)
    fr = _frame(anat, size)
    px = fr.px
    img = np.full((size, size), 0.03, np.float32)

    body = _ramp(1.0 - (np.abs(fr.u + 0.01) / 0.42) ** 4 - (np.abs(fr.v - 0.64) / 0.66) ** 4, 0.12)
    _paint(img, fr, 0.40 + 0.06 * fr.v, body)

    # One lung field (both lungs superimposed); the diaphragm is lower posteriorly,
    # so the posterior costophrenic sulcus is the deepest point.
    lc, lw, top = 0.03, 0.285 + anat.uniform(-0.01, 0.01), 0.12 + anat.uniform(-0.01, 0.01)
    w = fr.crop(lc - 1.15 * lw, lc + 1.15 * lw, top - 0.02, 0.92)
    t = np.clip((w.v - top) / 0.6, 0.0, 1.0)
    shape = _ramp(lw * np.sqrt(t) * (1.12 - 0.18 * t) - np.abs(w.u - lc), 1.5 * px) \
        * _ramp(w.v - top, 1.5 * px)
    dome = 0.70 + anat.uniform(-0.015, 0.015) + 0.08 * ((w.u - lc + 0.04) / lw) ** 2 + 0.05 * w.u
    lung = shape * _ramp(dome - w.v, 2 * px) * _ramp(0.86 - w.v, 1.5 * px)
    markings = 0.025 * _smooth_noise(anat, size, 14)[w.sl] + 0.09 * _gaussian(w, 0.03, 0.45, 0.06)
    _paint(img, w, 0.15 + anat.uniform(-0.02, 0.02) + markings, lung)

    if f.effusion != "none":
        level, climb = (0.74, 0.13) if f.effusion == "small" else (0.53, 0.15)
        post = np.clip((w.u - lc + lw) / (2 * lw), 0.0, 1.0)  # 0 anterior .. 1 posterior
        depth = w.v - (level + 0.03 + lesion.uniform(-0.012, 0.012) - climb * post ** 2)
        floor = _ramp(0.88 - w.v, 1.5 * px) * _ramp(dome + 0.05 - w.v, 3.0 * px)
        fluid = shape * floor * _ramp(depth, 0.02)
        _paint(img, w, 0.48 + 0.2 * np.clip(depth, 0.0, 0.3), fluid)

    if f.opacity != "none":
        cu = lesion.uniform(-0.02, 0.14)
        cv = lesion.uniform(0.25, 0.33) if f.opacity == "upper" else lesion.uniform(0.56, 0.63)
        blob = _blob(w, lesion, cu, cv, lesion.uniform(0.1, 0.115))
        _add(img, w, lesion.uniform(0.36, 0.42) * blob * shape)

    if f.pneumothorax == "present":
        # Apical lucency above the collapsed lung's apex, with its pleural line.
        apex = top + lesion.uniform(0.2, 0.24) + 0.25 * (w.u - lc) ** 2
        _paint(img, w, 0.04, lung * _ramp(apex - w.v, 2 * px))
        _add(img, w, 0.12 * lung * _ramp(0.012 - np.abs(w.v - apex), 2 * px))

    # Spine: vertebral bodies posteriorly, disc spaces as darker gaps.
    w = fr.crop(0.28, 0.5, 0.0, 1.1)
    spine = _ramp(0.045 - np.abs(w.u - 0.37 - 0.04 * w.v), 2 * px) * _ramp(w.v - 0.04, 2 * px)
    discs = 0.5 + 0.5 * _ramp(np.cos(w.v * (2 * np.pi * 13)) + 0.6, 0.4)
    sub = img[w.sl]
    np.maximum(sub, 0.56 * spine * discs, out=sub)
    # Sternum: a thin bright strip along the anterior chest wall.
    w = fr.crop(-0.4, -0.25, 0.1, 0.7)
    sternum = _ramp(0.014 - np.abs(w.u + 0.33 - 0.05 * w.v), 2 * px) \
        * (_ramp(w.v - 0.17, 0.02) * _ramp(0.62 - w.v, 0.02))
    _add(img, w, 0.18 * sternum)

    # Heart: anterior and low; an enlarged one also grows back towards the spine.
    tu, tv = anat.random(2)
    if f.heart == "enlarged":
        hr_u, hr_v, hc_u, hc_v = 0.195 + 0.015 * tu, 0.16 + 0.015 * tv, -0.07, 0.61
    else:
        hr_u, hr_v, hc_u, hc_v = 0.135 + 0.01 * tu, 0.125 + 0.01 * tv, -0.13, 0.64
    w = fr.crop(hc_u - 1.1 * hr_u, hc_u + 1.1 * hr_u, hc_v - 1.1 * hr_v, hc_v + 1.1 * hr_v)
    _paint(img, w, np.maximum(img[w.sl], 0.50), _ellipse(w, hc_u, hc_v, hr_u, hr_v))

    if f.device == "pacemaker":
        gen = (lesion.uniform(-0.31, -0.27), lesion.uniform(0.17, 0.21))
        ends = [(hc_u - 0.3 * hr_u, hc_v + 0.6 * hr_v), (hc_u + 0.1 * hr_u, hc_v - 0.3 * hr_v)]
        layer = _pacemaker(fr, lesion, gen, ends[: int(lesion.integers(1, 3))], (0.07, 0.14))
        np.maximum(img, 0.97 * layer, out=img)
    elif f.device == "sternotomy":
        # Wires seen edge-on along the sternum: short bright loops.
        v0, v1 = lesion.uniform(0.24, 0.28), lesion.uniform(0.56, 0.6)
        layer = _sternotomy(fr, lesion, -0.315, v0, v1, 0.03, 0.034)
        np.maximum(img, 0.97 * layer, out=img)
    return _finish(img, fr, film)


# --------------------------------------------------------------------------- writing


def _split_of(studies: int, seed: int) -> list[str]:
    """Deterministic ~70/10/20 split; val and test get at least one study each."""
    n_val = max(1, round(studies * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(studies * SPLIT_FRACTIONS[2]))
    labels = np.array(["train"] * (studies - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
    # Its own stream: SeedSequence pads keys with zeros to 4 words, so a nonzero 4th
    # word keeps it apart from every per-study [seed, i, k] stream.
    return labels[np.random.default_rng([seed, 0, 0, 0x5B117]).permutation(studies)].tolist()


def _png_bytes(img: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a (H, W) uint8 array.

    Hand-rolled because it is ~2.5x faster than PIL's encoder here (which tries all
    five row filters on every row): the "Up" filter is one vectorised numpy diff,
    then zlib level 1. The output has no timestamp or other metadata, so it is
    byte-for-byte deterministic.
    """
    h, w = img.shape
    up = np.empty((h, w + 1), np.uint8)
    up[:, 0] = 2  # filter type "Up": each byte minus the byte above it (mod 256)
    up[0, 1:] = img[0]
    np.subtract(img[1:], img[:-1], out=up[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bit, grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(up.tobytes(), 1)) + chunk(b"IEND", b""))


def plan_studies(studies: int, seed: int) -> list[dict]:
    """The annotation entries of the set, in study order, without rendering anything.

    Each entry is {"id", "report", "image_path", "split", "findings"}; it depends on
    (studies, seed) only, never on the image size.
    """
    width = max(5, len(str(studies - 1)))
    splits = _split_of(studies, seed)
    plan = []
    for i in range(studies):
        sid = f"synth_{i:0{width}d}"
        rng = np.random.default_rng([seed, i, 0])
        findings = sample_findings(rng)
        plan.append({
            "id": sid,
            "report": write_report(findings, rng),
            "image_path": [f"{sid}/0.png", f"{sid}/1.png"],
            "split": splits[i],
            "findings": findings.as_dict(),
        })
    return plan


def _render_studies(root: Path, entries: list[dict], indices: range, seed: int, image_size: int) -> int:
    """Both views of the studies `indices` into root/images; returns how many were written."""
    for i in indices:
        entry = entries[i - indices.start]
        findings = Findings(**entry["findings"])
        pix_rng = np.random.default_rng([seed, i, 1])
        (root / "images" / entry["id"]).mkdir()
        for view, render in enumerate((render_frontal, render_lateral)):
            png = _png_bytes(render(findings, pix_rng, image_size))
            (root / "images" / entry["image_path"][view]).write_bytes(png)
    return len(indices)


PARALLEL_MIN_STUDIES = 200
"""From this many studies the set is drawn by one process per usable CPU (each study has its own seed,
so the files are the same whoever draws them)."""


def _write_set(root: Path, studies: int, seed: int, image_size: int, progress: bool) -> None:
    plan = plan_studies(studies, seed)
    (root / "images").mkdir(parents=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    step = max(16, -(-studies // (cpus * 8))) if cpus > 1 and studies >= PARALLEL_MIN_STUDIES else studies
    chunks = [range(a, min(a + step, studies)) for a in range(0, studies, step)]
    bar = None
    if progress:
        from rich.console import Console  # only needed for the interactive bar
        from rich.progress import Progress

        console = Console(stderr=True)
        bar = Progress(console=console, transient=False, disable=not console.is_terminal)
        bar.start()
        task = bar.add_task("Synthesizing chest X-rays", total=studies)
    try:
        if len(chunks) == 1:
            for chunk in chunks:
                _render_studies(root, plan[chunk.start:chunk.stop], chunk, seed, image_size)
                if bar is not None:
                    bar.update(task, advance=len(chunk))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # fork: the children need only numpy and PIL, and start in milliseconds
            with ProcessPoolExecutor(min(cpus, len(chunks)), mp_context=multiprocessing.get_context("fork")) as pool:
                futures = [pool.submit(_render_studies, root, plan[c.start:c.stop], c, seed, image_size)
                           for c in chunks]
                for done in as_completed(futures):
                    n = done.result()
                    if bar is not None:
                        bar.update(task, advance=n)
    finally:
        if bar is not None:
            bar.stop()
    annotation: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for entry in plan:
        annotation[entry["split"]].append(entry)
    (root / "annotation.json").write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")


def _generate_atomically(final: Path, studies: int, seed: int, image_size: int, progress: bool) -> bool:
    return write_dir_atomically(final, lambda tmp: _write_set(tmp, studies, seed, image_size, progress))


def _check_args(studies: int, seed: int, image_size: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if studies < MIN_STUDIES:
        raise ValueError(f"studies must be >= {MIN_STUDIES} (every split needs a study), got {studies}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")


def synthesize(out_dir: Path | str, studies: int = 400, seed: int = 0, image_size: int = 256,
               progress: bool = False) -> Path:
    """Write the set into out_dir (annotation.json + images/) and return the annotation path.

    ``out_dir`` must not exist or be empty; the set appears there atomically.
    Raises FileExistsError if out_dir is non-empty, ValueError for bad arguments.
    """
    _check_args(studies, seed, image_size)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty")
    if not _generate_atomically(out, studies, seed, image_size, progress):
        raise FileExistsError(f"{out} was filled by someone else while synthesizing")
    return out / "annotation.json"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """cache_dir, else $R2GEN_LAUNCH_CACHE, else ~/.cache/r2gen-launch."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("R2GEN_LAUNCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "r2gen-launch"


def default_dataset(studies: int = 400, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Annotation path of the embedded default set, generated once into a cache dir.

    Safe under concurrency: each process generates into its own temporary sibling
    and renames it into place; a process that loses the race discards its copy.
    """
    image_size = 256
    _check_args(studies, seed, image_size)
    final = cache_root(cache_dir) / f"synth-v{DATASET_VERSION}-n{studies}-s{seed}-i{image_size}"
    ann = final / "annotation.json"
    if not ann.is_file():
        _generate_atomically(final, studies, seed, image_size, progress=False)
        if not ann.is_file():  # lost the race to something that is not a data set
            raise FileExistsError(f"{final} exists but holds no annotation.json; remove it and retry")
    return ann
