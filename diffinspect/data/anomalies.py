"""Synthetic defects pasted onto good images (DRAEM / CutPaste style).

Real defects are rare and arrive late, yet the scoring recipe has to be tuned and distilled students
selected before any exist. Pasting plausible defects onto held-out good images gives a labelled
validation set from good parts alone.

Every kind builds a soft mask and a full-frame "target" appearance; the result is
``img + mask * (target - img)``, so pixels where the mask is 0 are untouched bit for bit. Contrast is
chosen from the image's own intensity statistics (and flipped when there is no room), so the same
code makes visible defects on a dark rubber seal and on a bright ceramic tile.

The drawing primitives here (Perlin noise, anti-aliased strokes, irregular blobs, crack paths) are
also used by :mod:`diffinspect.data.synthetic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from diffinspect import DiffinspectError

ANOMALY_KINDS = ("perlin_blend", "cutpaste", "scratch", "spot", "crack", "chip", "band")

MIN_SIDE = 32
_MIN_DELTA = 20.0  # grey levels: weaker than this and a pasted defect is noise, not a label
_SUPERSAMPLE = 4  # strokes are drawn at 4x and area-averaged down: sub-pixel widths, soft edges


# --------------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's quintic: zero first and second derivative at lattice points, so no grid creases.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[float, float], rng: np.random.Generator,
                 octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """Gradient (Perlin) noise of shape (H, W), float32, roughly in [-1, 1].

    res is the number of noise periods along (y, x) for the first octave; any shape and any
    non-integer res work (the lattice is randomly offset, so noise is not aligned to the frame).
    Each further octave doubles the frequency and scales the amplitude by persistence.
    """
    h, w = int(shape[0]), int(shape[1])
    total = np.zeros((h, w), dtype=np.float32)
    amp, norm = 1.0, 0.0
    ry, rx = float(res[0]), float(res[1])
    for _ in range(max(1, octaves)):
        total += amp * _perlin_octave(h, w, ry, rx, rng)
        norm += amp
        amp *= persistence
        ry, rx = ry * 2.0, rx * 2.0
    return total / np.float32(norm)


def _perlin_octave(h: int, w: int, ry: float, rx: float, rng: np.random.Generator) -> np.ndarray:
    y = (np.arange(h, dtype=np.float32) + 0.5) * np.float32(ry / h) + np.float32(rng.uniform(0, 1))
    x = (np.arange(w, dtype=np.float32) + 0.5) * np.float32(rx / w) + np.float32(rng.uniform(0, 1))
    y0 = np.floor(y).astype(np.intp)
    x0 = np.floor(x).astype(np.intp)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    angles = rng.uniform(0.0, 2.0 * np.pi, (int(y0[-1]) + 2, int(x0[-1]) + 2))
    gy = np.sin(angles).astype(np.float32)
    gx = np.cos(angles).astype(np.float32)
    yi, xi = y0[:, None], x0[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # Dot product of the corner's gradient with the offset from that corner.
        return gx[yi + dy, xi + dx] * (fx - dx) + gy[yi + dy, xi + dx] * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    # The 2-D gradient-noise range is +-sqrt(0.5); scale to about +-1.
    return ((top + v * (bottom - top)) * np.float32(np.sqrt(2.0))).astype(np.float32)


def stroke_alpha(shape: tuple[int, int], paths: Sequence[np.ndarray],
                 widths: Sequence[np.ndarray]) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 of polylines with per-vertex widths in pixels.

    paths[i] is an (N, 2) array of (x, y) pixel coordinates; widths[i] holds N widths (a segment
    takes the mean of its two ends), so strokes can taper. Widths below a pixel give partial coverage.
    """
    h, w = shape
    out = np.zeros((h, w), dtype=np.float32)
    pts_all = [np.asarray(p, dtype=np.float64) for p in paths if len(p) >= 2]
    if not pts_all:
        return out
    wmax = max(float(np.max(wd)) for wd in widths)
    stacked = np.concatenate(pts_all)
    pad = wmax + 2.0
    x0 = int(max(0, np.floor(stacked[:, 0].min() - pad)))
    y0 = int(max(0, np.floor(stacked[:, 1].min() - pad)))
    x1 = int(min(w, np.ceil(stacked[:, 0].max() + pad) + 1))
    y1 = int(min(h, np.ceil(stacked[:, 1].max() + pad) + 1))
    if x1 <= x0 or y1 <= y0:
        return out
    ss = _SUPERSAMPLE
    canvas = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), dtype=np.uint8)
    shift = 4  # cv2 fixed-point bits: sub-pixel vertex positions on the supersampled canvas
    for pts, wd in zip(paths, widths, strict=True):
        pts = np.asarray(pts, dtype=np.float64)
        wd = np.broadcast_to(np.asarray(wd, dtype=np.float64), (len(pts),))
        # Pixel centres sit at integer coordinates; on the ss canvas pixel x spans [x*ss, (x+1)*ss).
        q = np.round(((pts - (x0, y0)) + 0.5) * ss * (1 << shift)).astype(np.int64)
        for i in range(len(pts) - 1):
            thick = max(1, int(round(0.5 * (wd[i] + wd[i + 1]) * ss)))
            cv2.line(canvas, (int(q[i, 0]), int(q[i, 1])), (int(q[i + 1, 0]), int(q[i + 1, 1])), 255,
                     thickness=thick, lineType=cv2.LINE_AA, shift=shift)
    small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    out[y0:y1, x0:x1] = small.astype(np.float32) / 255.0
    return out


def blob_alpha(shape: tuple[int, int], centre: tuple[float, float], radius: float, rng: np.random.Generator,
               aspect: float = 1.0, angle: float = 0.0, roughness: float = 0.15, jag: float = 0.0,
               soft: float = 0.7) -> np.ndarray:
    """Coverage (H, W) float32 of an irregular blob: an ellipse whose radius wobbles with angle.

    roughness scales smooth low-order harmonics (lumpy outline), jag adds high-order ones (a
    fractured or frayed edge). soft is the edge width in pixels.
    """
    h, w = shape
    out = np.zeros((h, w), dtype=np.float32)
    cx, cy = centre
    reach = radius * max(aspect, 1.0 / max(aspect, 1e-3)) * (1.0 + 2.0 * (roughness + jag)) + soft + 2
    x0, x1 = int(max(0, np.floor(cx - reach))), int(min(w, np.ceil(cx + reach) + 1))
    y0, y1 = int(max(0, np.floor(cy - reach))), int(min(h, np.ceil(cy + reach) + 1))
    # Draw the harmonics even when the blob falls outside the frame, so rng use does not depend on it.
    orders = np.arange(2, 6)
    amps = roughness * rng.uniform(0.3, 1.0, orders.size) / orders ** 0.5
    phases = rng.uniform(0, 2 * np.pi, orders.size)
    jorders = np.arange(7, 15)
    jamps = jag * rng.uniform(0.2, 1.0, jorders.size) / jorders ** 0.3
    jphases = rng.uniform(0, 2 * np.pi, jorders.size)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    ca, sa = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (dx * ca + dy * sa) / np.float32(aspect ** 0.5)
    v = (-dx * sa + dy * ca) * np.float32(aspect ** 0.5)
    r = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    wobble = np.ones_like(r)
    for a, k, p in zip(amps, orders, phases, strict=True):
        wobble += np.float32(a) * np.sin(k * phi + np.float32(p))
    for a, k, p in zip(jamps, jorders, jphases, strict=True):
        wobble += np.float32(a) * np.sin(k * phi + np.float32(p))
    edge = np.float32(radius) * np.maximum(wobble, np.float32(0.2))
    out[y0:y1, x0:x1] = np.clip((edge - r) / np.float32(max(soft, 1e-3)) + 0.5, 0.0, 1.0)
    return out


def bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int) -> np.ndarray:
    """n points (x, y) along the quadratic Bezier curve p0 -> p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def crack_paths(rng: np.random.Generator, start: tuple[float, float], step: float, n_steps: int,
                width: float, n_branches: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A crack: a wandering main path with a few thinner branches, widths tapering to the tips."""
    def walk(p: np.ndarray, heading: float, steps: int, w0: float) -> tuple[np.ndarray, np.ndarray]:
        pts = [p]
        for _ in range(steps):
            heading += rng.normal(0.0, 0.45)  # cracks zig-zag along grain boundaries
            p = p + step * rng.uniform(0.7, 1.3) * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p)
        arr = np.array(pts)
        taper = np.linspace(1.0, 0.35, len(arr))
        return arr, w0 * taper

    heading = rng.uniform(0, 2 * np.pi)
    main, main_w = walk(np.asarray(start, dtype=np.float64), heading, n_steps, width)
    paths, widths = [main], [main_w]
    for _ in range(n_branches):
        i = int(rng.integers(1, max(2, len(main) - 1)))
        seg = main[min(i + 1, len(main) - 1)] - main[i - 1]
        base = float(np.arctan2(seg[1], seg[0]))
        side = 1.0 if rng.random() < 0.5 else -1.0
        steps = int(rng.integers(2, max(3, n_steps // 2 + 1)))
        b, bw = walk(main[i], base + side * rng.uniform(0.4, 1.1), steps, float(main_w[i]) * 0.7)
        paths.append(b)
        widths.append(bw)
    return paths, widths


# --------------------------------------------------------------------------------------------------
# Image statistics and contrast
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stats:
    mean: float  # luma, 0..255
    std: float
    lo: float  # 2nd percentile of luma
    hi: float  # 98th percentile


def _stats(img: np.ndarray) -> _Stats:
    luma = img.mean(axis=2)
    lo, hi = np.percentile(luma, (2, 98))
    return _Stats(float(luma.mean()), float(luma.std()), float(lo), float(hi))


def _signed_delta(st: _Stats, rng: np.random.Generator, base: float, prefer: int = 0) -> float:
    """A brightness change scaled to the image's own spread, pointing where there is room to move.

    prefer = +1/-1 asks for brighter/darker (e.g. cracks are dark); 0 picks at random.
    """
    # The global std of an object on a background is mostly the part/background step: cap it.
    spread = min(st.std, 40.0)
    lo = max(_MIN_DELTA, spread)
    hi = max(lo + 15.0, 3.0 * spread, 70.0)
    d = float(rng.uniform(lo, hi))
    sign = prefer if prefer else (1 if rng.random() < 0.5 else -1)
    room = 255.0 - base if sign > 0 else base
    if room < d:
        other = 255.0 - room
        if room >= 1.5 * _MIN_DELTA or room >= other:
            d = room  # saturate in the asked direction: a crack may go black, a glare spot white
        else:
            # No room this way (a white part cannot get brighter): go the other way.
            sign, d = -sign, min(d, other)
    return sign * d


def _weighted_mean(img: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-channel mean of img under weight (H, W); the global mean where weight is empty."""
    total = float(weight.sum())
    if total < 1e-6:
        return img.reshape(-1, img.shape[2]).mean(axis=0)
    return (img * weight[:, :, None]).reshape(-1, img.shape[2]).sum(axis=0) / total


def _surround(mask: np.ndarray, px: int = 3) -> np.ndarray:
    """Mask dilated by px pixels: the neighbourhood whose mean a defect is contrasted against."""
    k = 2 * px + 1
    return cv2.dilate((mask > 0.05).astype(np.uint8), np.ones((k, k), np.uint8)).astype(np.float32)


def _ensure_visible(img: np.ndarray, mask: np.ndarray, target: np.ndarray, st: _Stats,
                    rng: np.random.Generator) -> np.ndarray:
    """Shift target when it barely differs from img where the mask is solid (e.g. self-similar cutpaste)."""
    core = mask > 0.5
    if not core.any():
        core = mask >= mask.max() * 0.5
    diff = float(np.abs(target[core] - img[core]).mean())
    if diff >= 0.75 * _MIN_DELTA:
        return target
    base = float(img[core].mean())
    return np.clip(target + _signed_delta(st, rng, base), 0.0, 255.0)


# --------------------------------------------------------------------------------------------------
# Anomaly kinds: each returns (mask (H, W) in [0, 1], target (H, W, C)), both float32
# --------------------------------------------------------------------------------------------------


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _random_point(rng: np.random.Generator, h: int, w: int, margin: float = 0.0) -> np.ndarray:
    mx, my = min(margin, w / 2 - 1), min(margin, h / 2 - 1)
    return np.array([rng.uniform(mx, w - 1 - mx), rng.uniform(my, h - 1 - my)])


def _perlin_blend(img: np.ndarray, rng: np.random.Generator, st: _Stats,
                  source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, c = img.shape
    side = min(h, w)
    # A box of varied size holds the noise region, so small anomalies happen and not only big ones.
    bs = _loguniform(rng, 0.06, 0.6) * side
    bh = int(np.clip(round(bs * rng.uniform(0.7, 1.4)), 6, h))
    bw = int(np.clip(round(bs * rng.uniform(0.7, 1.4)), 6, w))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    res = (rng.uniform(1.0, 4.0), rng.uniform(1.0, 4.0))
    noise = perlin_noise((bh, bw), res, rng, octaves=3)
    # Subtract an elliptical bowl so the region stays blob-like instead of being cut by the box edge.
    yy = (np.arange(bh, dtype=np.float32) + 0.5) / bh * 2 - 1
    xx = (np.arange(bw, dtype=np.float32) + 0.5) / bw * 2 - 1
    field = noise - 0.9 * (yy[:, None] ** 2 + xx[None, :] ** 2)
    thr = np.quantile(field, 1.0 - rng.uniform(0.25, 0.55))
    region = np.zeros((h, w), dtype=np.float32)
    region[y0:y0 + bh, x0:x0 + bw] = (field >= thr).astype(np.float32)
    mask = np.clip(cv2.GaussianBlur(region, (0, 0), 0.6) * 1.25, 0.0, 1.0)
    mask[region > 0] = 1.0

    if source is not None:
        tex = source.astype(np.float32)
        if rng.random() < 0.5:
            tex = tex[:, ::-1]
        if rng.random() < 0.5:
            tex = tex[::-1]
        # Roll so the borrowed texture is not aligned with the same spot of a similar image.
        tex = np.roll(tex, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
        tex = tex * rng.uniform(0.7, 1.3) + rng.uniform(-0.5, 0.5) * st.std
    else:
        base = _weighted_mean(img, mask)
        delta = _signed_delta(st, rng, float(base.mean()))
        grain = perlin_noise((h, w), (rng.uniform(4, 16), rng.uniform(4, 16)), rng, octaves=3)
        tint = rng.normal(0.0, 0.25 * abs(delta), c) if c == 3 else np.zeros(c)
        tex = base + delta + tint + grain[:, :, None] * max(st.std, 8.0) * rng.uniform(0.5, 1.5)
    opacity = rng.uniform(0.5, 1.0)
    target = img + opacity * (np.clip(tex, 0, 255) - img)
    return mask, target


def _cutpaste(img: np.ndarray, rng: np.random.Generator, st: _Stats,
              source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    src = img if source is None else source.astype(np.float32)
    area = _loguniform(rng, 0.04, 0.3) ** 2 * side * side
    aspect = _loguniform(rng, 0.3, 3.3)  # long thin patches are CutPaste's "scar" variant
    pw = float(np.clip(np.sqrt(area * aspect), 3, 0.8 * w))
    ph = float(np.clip(np.sqrt(area / aspect), 3, 0.8 * h))
    cs = _random_point(rng, h, w, margin=max(pw, ph) / 2)
    cd = _random_point(rng, h, w, margin=min(pw, ph) / 2)
    if source is None:
        # From the same image the patch must land elsewhere, else it pastes over itself.
        for _ in range(10):
            if np.abs(cd - cs).max() >= 0.6 * max(pw, ph):
                break
            cd = _random_point(rng, h, w, margin=min(pw, ph) / 2)
    angle = float(rng.uniform(-45, 45)) if rng.random() < 0.5 else 0.0
    m = cv2.getRotationMatrix2D((float(cs[0]), float(cs[1])), angle, 1.0)
    m[:, 2] += cd - cs
    # Reflect at the border so a rotated patch never brings in black corners.
    warped = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if warped.ndim == 2:
        warped = warped[:, :, None]
    rect = np.zeros((h, w), dtype=np.float32)
    x0, x1 = cs[0] - pw / 2, cs[0] + pw / 2
    y0, y1 = cs[1] - ph / 2, cs[1] + ph / 2
    rect[max(0, int(round(y0))):int(round(y1)), max(0, int(round(x0))):int(round(x1))] = 1.0
    mask = cv2.warpAffine(rect, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    if not (mask > 0.5).any():  # a degenerate patch: fall back to an axis-aligned one at the destination
        mask = np.zeros((h, w), dtype=np.float32)
        cx, cy = int(cd[0]), int(cd[1])
        mask[max(0, cy - 2):cy + 2, max(0, cx - 2):cx + 2] = 1.0
    gain = rng.uniform(0.8, 1.2)
    target = np.clip((warped - st.mean) * gain + st.mean + rng.uniform(-0.6, 0.6) * st.std, 0, 255)
    return np.clip(mask, 0.0, 1.0), target


def _scratch(img: np.ndarray, rng: np.random.Generator, st: _Stats,
             source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    length = _loguniform(rng, 0.08, 0.6) * side
    p0 = _random_point(rng, h, w, margin=2)
    heading = rng.uniform(0, 2 * np.pi)
    p2 = p0 + length * np.array([np.cos(heading), np.sin(heading)])
    normal = np.array([-np.sin(heading), np.cos(heading)])
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.25, 0.25) * length
    pts = bezier(p0, p1, p2, 24)
    width = rng.uniform(0.7, 2.5) * max(1.0, side / 256)
    taper = 0.5 + 0.5 * np.sin(np.linspace(0.15, np.pi - 0.15, len(pts)))
    mask = stroke_alpha((h, w), [pts], [width * taper])
    if not (mask > 0).any():  # the curve left the frame: pull it back inside
        pts = np.clip(pts, 1, [w - 2, h - 2])
        mask = stroke_alpha((h, w), [pts], [width * taper])
    local = _weighted_mean(img, _surround(mask))
    delta = _signed_delta(st, rng, float(local.mean()))
    target = np.broadcast_to(np.clip(local + delta, 0, 255), img.shape).astype(np.float32)
    return mask, target


def _spot(img: np.ndarray, rng: np.random.Generator, st: _Stats,
          source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    radius = _loguniform(rng, 1.5, max(2.0, 0.08 * side))
    centre = _random_point(rng, h, w, margin=radius)
    mask = blob_alpha((h, w), (centre[0], centre[1]), radius, rng, aspect=_loguniform(rng, 0.6, 1.6),
                      angle=rng.uniform(0, np.pi), roughness=rng.uniform(0.05, 0.3))
    local = _weighted_mean(img, _surround(mask))
    delta = _signed_delta(st, rng, float(local.mean()))
    fill = np.clip(local + delta, 0, 255)
    # Partly opaque: some of the surface still shows, as in a real stain or pit.
    target = img + rng.uniform(0.7, 1.0) * (fill - img)
    return mask, np.clip(target, 0, 255).astype(np.float32)


def _crack(img: np.ndarray, rng: np.random.Generator, st: _Stats,
           source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    n_steps = int(rng.integers(4, 13))
    step = _loguniform(rng, 0.02, 0.06) * side
    start = _random_point(rng, h, w, margin=0.15 * side)
    width = rng.uniform(0.8, 2.2) * max(1.0, side / 256)
    paths, widths = crack_paths(rng, (start[0], start[1]), step, n_steps, width, int(rng.integers(0, 4)))
    mask = stroke_alpha((h, w), paths, widths)
    if not (mask > 0).any():
        mask = stroke_alpha((h, w), [np.clip(p, 1, [w - 2, h - 2]) for p in paths], widths)
    local = _weighted_mean(img, _surround(mask))
    delta = _signed_delta(st, rng, float(local.mean()), prefer=-1)
    target = np.broadcast_to(np.clip(local + delta, 0, 255), img.shape).astype(np.float32)
    return mask, target


def _chip(img: np.ndarray, rng: np.random.Generator, st: _Stats,
          source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    radius = _loguniform(rng, 0.03, 0.15) * side
    luma = img.mean(axis=2)
    gmag = np.abs(cv2.Sobel(luma, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(luma, cv2.CV_32F, 0, 1))
    gmag[:2], gmag[-2:], gmag[:, :2], gmag[:, -2:] = 0, 0, 0, 0
    strong = np.flatnonzero(gmag >= max(np.percentile(gmag, 97), 1e-3))
    if rng.random() < 0.7 and strong.size and gmag.max() >= 2 * _MIN_DELTA:
        # A chip sits on an edge of the part: pick one of the strongest edges.
        idx = int(strong[rng.integers(strong.size)])
        centre = (float(idx % w), float(idx // w))
    else:
        # Otherwise bite from the frame border or a corner (a part cut by the field of view).
        t = rng.uniform(0, 1)
        corners = [(t * (w - 1), 0.0), (t * (w - 1), h - 1.0), (0.0, t * (h - 1)), (w - 1.0, t * (h - 1))]
        centre = corners[int(rng.integers(4))]
    mask = blob_alpha((h, w), centre, radius, rng, aspect=_loguniform(rng, 0.6, 1.6),
                      angle=rng.uniform(0, np.pi), roughness=0.2, jag=rng.uniform(0.03, 0.12), soft=0.6)
    local = _weighted_mean(img, _surround(mask))
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    if rng.random() < 0.5 or abs(float(bg.mean() - local.mean())) < _MIN_DELTA:
        # Background-like colour is invisible on textures: use a dark, shadowed fill instead (or a
        # bright one on a part too dark to show a shadow).
        base = float(local.mean())
        bg = np.full(img.shape[2], base + _signed_delta(st, rng, base, prefer=-1))
    grain = perlin_noise((h, w), (rng.uniform(3, 10), rng.uniform(3, 10)), rng)[:, :, None]
    target = np.clip(bg + grain * rng.uniform(2.0, 6.0), 0, 255).astype(np.float32)
    # A chip on the part's edge also covers some background; where the fill matches what is already
    # there nothing is missing, so only label (and change) what differs.
    differs = np.abs(target - img).mean(axis=2) / _MIN_DELTA
    if (mask * differs > 0.5).any():
        mask = mask * np.clip(differs, 0.0, 1.0)
    return mask, target


def _band(img: np.ndarray, rng: np.random.Generator, st: _Stats,
          source: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = img.shape
    side = min(h, w)
    half = _loguniform(rng, 0.02, 0.12) * side
    soft = rng.uniform(0.7, 0.35 * half + 0.8)
    theta = rng.uniform(0, np.pi)
    p = _random_point(rng, h, w, margin=half)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = (xx - p[0]) * np.float32(np.cos(theta)) + (yy - p[1]) * np.float32(np.sin(theta))
    across = -(xx - p[0]) * np.float32(np.sin(theta)) + (yy - p[1]) * np.float32(np.cos(theta))
    mask = np.clip((half - np.abs(across)) / soft + 0.5, 0.0, 1.0)
    if rng.random() < 0.5:
        # Only part of the frame: a streak from a roller or a partial shadow, with soft ends.
        length = rng.uniform(0.25, 0.8) * max(h, w)
        mask *= np.clip((length / 2 - np.abs(along)) / (2 * soft) + 0.5, 0.0, 1.0)
    if not (mask > 0.5).any():
        mask = np.clip((half + 2 - np.abs(across)) / soft + 0.5, 0.0, 1.0)
    local = _weighted_mean(img, mask)
    delta = _signed_delta(st, rng, float(local.mean()))
    # An additive shading change: the surface texture stays visible inside the band.
    target = np.clip(img + delta, 0, 255).astype(np.float32)
    return mask.astype(np.float32), target


_KINDS = {
    "perlin_blend": _perlin_blend,
    "cutpaste": _cutpaste,
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
    "chip": _chip,
    "band": _band,
}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def check_kinds(kinds: Sequence[str]) -> None:
    for k in kinds:
        if k not in _KINDS:
            raise DiffinspectError(f"unknown anomaly kind {k!r}: choose from {', '.join(ANOMALY_KINDS)}")


def _as_hwc(img: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise DiffinspectError(f"{what} must be a uint8 numpy array")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise DiffinspectError(f"{what} must have shape (H, W, C) with C = 1 or 3, got {img.shape}")
    return img


def _match_source(source: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Bring a texture source to img's size and channel count."""
    h, w, c = shape
    src = _as_hwc(source, "source")
    if src.shape[2] != c:
        src = src.mean(axis=2, keepdims=True).astype(np.uint8) if c == 1 else np.repeat(src, 3, axis=2)
    if src.shape[:2] != (h, w):
        src = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR)
        if src.ndim == 2:
            src = src[:, :, None]
    return src


def paste_anomaly(img: np.ndarray, rng: np.random.Generator, kind: str | None = None,
                  source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paste one synthetic defect onto a good image.

    img: uint8 (H, W, C), C = 1 or 3 (a 2-D gray array also works), min(H, W) >= 32.
    kind: one of ANOMALY_KINDS, or None for a random one. source: another good image (any size,
    same or other channel count) to borrow texture from for perlin_blend and cutpaste; without it
    they use a noise texture and img itself.
    Returns (new uint8 image of img's shape, float32 mask (H, W) in [0, 1]). The mask is the defect's
    soft coverage (1 inside, fractional on anti-aliased edges); pixels where it is 0 are unchanged.
    """
    arr = _as_hwc(img, "image")
    h, w, c = arr.shape
    if min(h, w) < MIN_SIDE:
        raise DiffinspectError(f"image must be at least {MIN_SIDE} pixels on each side, got {w}x{h}")
    if kind is None:
        kind = ANOMALY_KINDS[int(rng.integers(len(ANOMALY_KINDS)))]
    check_kinds([kind])
    src = _match_source(source, arr.shape) if source is not None else None
    x = arr.astype(np.float32)
    st = _stats(x)
    mask, target = _KINDS[kind](x, rng, st, src)
    mask = np.clip(mask, 0.0, 1.0).astype(np.float32)
    target = _ensure_visible(x, mask, np.asarray(target, dtype=np.float32), st, rng)
    out = x + mask[:, :, None] * (target - x)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.reshape(img.shape), mask


def anomaly_set(good: list[np.ndarray], rng: np.random.Generator, kinds: Sequence[str] | None = None,
                per_image: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A synthetic-defect validation set: per_image anomalous copies of each good image.

    Kinds are drawn at random from kinds (default: all); perlin_blend and cutpaste borrow texture
    from another image of the set, as a defect on the line would bring foreign material.
    Returns (images, masks) in the order of good.
    """
    kinds = tuple(ANOMALY_KINDS if kinds is None else kinds)
    if not kinds:
        raise DiffinspectError("no anomaly kinds given")
    check_kinds(kinds)
    if per_image < 1:
        raise DiffinspectError(f"per_image must be at least 1, got {per_image}")
    images, masks = [], []
    for i, img in enumerate(good):
        for _ in range(per_image):
            kind = kinds[int(rng.integers(len(kinds)))]
            source = None
            if len(good) > 1 and rng.random() < 0.7:
                j = int(rng.integers(len(good) - 1))
                source = good[j + 1 if j >= i else j]
            out, mask = paste_anomaly(img, rng, kind, source)
            images.append(out)
            masks.append(mask)
    return images, masks
