"""The embedded synthetic set's images: a frontal (PA) and a lateral grayscale radiograph that show
a study's findings (r2gen.data.synth publishes the set).

Every finding is drawn large and bright enough to survive R2Gen's train transform (resize to
64-256 px, random crop of ~87%, horizontal flip). A view's randomness is split into anatomy,
lesion and film streams (`_streams`), so two renders with the same generator that differ in one
finding differ only in that finding's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from r2gen.data.synth_reports import Findings

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
    """Soft filled ellipse inside box w; the edge ramp is `soft` pixels wide."""
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
