"""A deterministic synthetic production line, for tests and `inspect demo` (no downloads).

Three products: brushed ``metal`` and woven ``fabric`` (textures) and a ``washer`` (an object on a
conveyor). Every product is rendered in RGB; metal is near-gray (a faint cool tint) but still stored
with three channels, so every product goes through the same colour path. Good frames vary the way a
real line does (lighting, position, texture phase, sensor noise), so a detector cannot memorize one
image. Defects are drawn after the good frame from the same generator, so rendering with and without
a defect from the same rng state gives the same part, differing only where the defect is.

``make_line`` writes an MVTec-AD style folder that :func:`diffinspect.data.datasets.labelled_set`
reads directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from diffinspect import DiffinspectError
from diffinspect.data.anomalies import bezier, blob_alpha, crack_paths, stroke_alpha

PRODUCTS = ("metal", "fabric", "washer")
DEFECTS = ("scratch", "spot", "crack", "missing", "contamination")

MIN_SIZE = 32
# Defect masks outside this share of the frame are redrawn (a few tries): visible but not absurd.
_AREA_RANGE = (0.004, 0.06)
_MASK_LEVEL = 0.25  # coverage above which a pixel counts as defective in the ground-truth mask


@dataclass
class _Scene:
    image: np.ndarray  # float32 (s, s, 3) in [0, 1]
    support: np.ndarray  # bool (s, s): where defects may sit (the part, or the texture away from borders)
    background: np.ndarray | None = None  # what shows through where material is missing (objects only)
    part: np.ndarray | None = None  # float (s, s) coverage of the object (objects only)
    centre: tuple[float, float] = (0.0, 0.0)
    radii: tuple[float, float] = (0.0, 0.0)  # outer and inner radius of the part


# --------------------------------------------------------------------------------------------------
# Good products
# --------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, s: int, cell: float) -> np.ndarray:
    """Zero-mean value noise with features about `cell` pixels wide (a coarse grid upsampled)."""
    n = max(2, int(np.ceil(s / cell)) + 2)
    grid = rng.standard_normal((n, n)).astype(np.float32)
    big = cv2.resize(grid, (n * s // (n - 2), n * s // (n - 2)), interpolation=cv2.INTER_CUBIC)
    off = (big.shape[0] - s) // 2
    return big[off:off + s, off:off + s]


def _streaks(rng: np.random.Generator, s: int, along: float, across: float) -> np.ndarray:
    """Unit-variance noise stretched along x: the marks a brush or grinding belt leaves."""
    # Long streaks: a few noise columns stretched along x (cubic), far cheaper than a wide blur.
    cols = max(4, int(np.ceil(s / along)) + 3) if along > 2 else s
    n = rng.standard_normal((s, cols)).astype(np.float32)
    n = cv2.GaussianBlur(n, (0, 0), sigmaX=0.01 if cols < s else along, sigmaY=across,
                         borderType=cv2.BORDER_REFLECT)
    if cols < s:
        n = cv2.resize(n, (s, s), interpolation=cv2.INTER_CUBIC)
    return n / max(float(n.std()), 1e-6)


def _lighting(rng: np.random.Generator, s: int, strength: float) -> np.ndarray:
    """A gentle linear light falloff in a random direction (no two frames are lit the same)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s) - 0.5
    a = rng.uniform(0, 2 * np.pi)
    amp = np.float32(strength * rng.uniform(0.3, 1.0))
    return amp * (xx * np.float32(np.cos(a)) + yy * np.float32(np.sin(a)))


def _metal(rng: np.random.Generator, s: int) -> _Scene:
    k = s / 128
    gray = (rng.uniform(0.48, 0.6)
            + 0.035 * _streaks(rng, s, 14 * k, 0.45 * k)
            + 0.025 * _streaks(rng, s, 40 * k, 1.5 * k)
            + 0.02 * _smooth_noise(rng, s, 40 * k)
            + _lighting(rng, s, 0.12)
            + 0.008 * rng.standard_normal((s, s)).astype(np.float32))
    tint = np.array([0.97, 1.0, 1.04], np.float32) + rng.normal(0, 0.005, 3).astype(np.float32)
    img = gray[:, :, None] * tint
    m = max(2, int(4 * k))
    support = np.zeros((s, s), bool)
    support[m:-m, m:-m] = True
    return _Scene(np.clip(img, 0, 1).astype(np.float32), support)


def _fabric(rng: np.random.Generator, s: int) -> _Scene:
    k = s / 128
    period = 8.0 * k * rng.uniform(0.97, 1.03)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    a = np.deg2rad(rng.uniform(-2.0, 2.0))  # the cloth never lies perfectly square to the camera
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    u = ca * xx + sa * yy + np.float32(rng.uniform(0, 2 * period) + s)
    v = -sa * xx + ca * yy + np.float32(rng.uniform(0, 2 * period) + s)
    # Threads wander a little: a smooth displacement of a fraction of a thread.
    u += np.float32(0.12 * period) * _smooth_noise(rng, s, 20 * k)
    v += np.float32(0.12 * period) * _smooth_noise(rng, s, 20 * k)
    col, row = np.floor(u / period), np.floor(v / period)
    fx, fy = u / period - col, v / period - row
    col_i, row_i = col.astype(np.int64), row.astype(np.int64)
    # Each thread has its own slight thickness/brightness (yarn is never uniform).
    warp_shade = rng.normal(1.0, 0.05, 64).astype(np.float32)[col_i % 64]
    weft_shade = rng.normal(1.0, 0.05, 64).astype(np.float32)[row_i % 64]
    across_warp = np.sin(np.pi * fx) ** 0.6
    across_weft = np.sin(np.pi * fy) ** 0.6
    warp_on_top = (col_i + row_i) % 2 == 0  # plain weave: over one, under one
    # A thread on top arches over the crossing: brightest mid-cell, shaded where it dives under.
    warp_val = across_warp * (0.65 + 0.35 * np.sin(np.pi * fy)) * warp_shade
    weft_val = across_weft * (0.65 + 0.35 * np.sin(np.pi * fx)) * weft_shade
    val = np.where(warp_on_top, warp_val, weft_val)
    fibre = np.where(warp_on_top, _streaks(rng, s, 0.4 * k, 3 * k), _streaks(rng, s, 3 * k, 0.4 * k))
    val = 0.22 + 0.78 * val + 0.04 * fibre
    warp_col = np.array([0.70, 0.62, 0.47], np.float32) * np.float32(rng.uniform(0.93, 1.07))
    weft_col = np.array([0.62, 0.54, 0.40], np.float32) * np.float32(rng.uniform(0.93, 1.07))
    colour = np.where(warp_on_top[:, :, None], warp_col, weft_col)
    img = val[:, :, None] * colour * (1.0 + _lighting(rng, s, 0.2))[:, :, None]
    img = cv2.GaussianBlur(img, (0, 0), 0.5 * k)  # optics: the weave cell edges are never razor sharp
    img += 0.008 * rng.standard_normal((s, s, 3)).astype(np.float32)
    m = max(2, int(4 * k))
    support = np.zeros((s, s), bool)
    support[m:-m, m:-m] = True
    return _Scene(np.clip(img, 0, 1).astype(np.float32), support)


def _cover(dist_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (positive inside), one pixel of ramp."""
    return np.clip(dist_inside + 0.5, 0.0, 1.0)


def _washer(rng: np.random.Generator, s: int) -> _Scene:
    k = s / 128
    # Conveyor belt: dark, slightly green-grey rubber with a fine grain.
    bg_gray = (rng.uniform(0.15, 0.2) + 0.02 * _smooth_noise(rng, s, 10 * k)
               + 0.015 * rng.standard_normal((s, s)).astype(np.float32) + _lighting(rng, s, 0.05))
    background = bg_gray[:, :, None] * np.array([0.95, 1.0, 0.97], np.float32)

    cx = s / 2 + rng.uniform(-3, 3) * k
    cy = s / 2 + rng.uniform(-3, 3) * k
    theta = rng.uniform(-0.15, 0.15)  # the part is placed by a fixture: only a little rotation
    r_out, r_in, r_groove, r_bolt, bolt = 0.34 * s, 0.12 * s, 0.275 * s, 0.2 * s, 0.035 * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    d = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx)

    part = _cover(np.float32(r_out) - d) * _cover(d - np.float32(r_in))
    for ang in (theta, theta + np.pi):  # two mounting holes
        bx, by = cx + r_bolt * np.cos(ang), cy + r_bolt * np.sin(ang)
        part *= _cover(np.sqrt((xx - np.float32(bx)) ** 2 + (yy - np.float32(by)) ** 2) - np.float32(bolt))
    # A key notch on the rim makes the orientation visible (and one more feature to reconstruct).
    na = theta + np.pi / 2
    along = dx * np.float32(np.cos(na)) + dy * np.float32(np.sin(na))
    across = -dx * np.float32(np.sin(na)) + dy * np.float32(np.cos(na))
    notch = _cover(along - np.float32(r_out - 0.06 * s)) * _cover(np.float32(0.03 * s) - np.abs(across))
    part *= 1.0 - notch

    light = rng.uniform(0, 2 * np.pi)
    gain = rng.uniform(0.9, 1.1)
    # Turned-metal rings: brightness varies with radius only, as a lathe leaves it.
    rings = np.interp(d.ravel(), np.arange(0, s, 0.75 * k), rng.normal(0, 1, len(np.arange(0, s, 0.75 * k))))
    rings = rings.reshape(s, s).astype(np.float32)
    shade = (0.6 + 0.08 * np.cos(phi - np.float32(light)) * d / np.float32(r_out) + 0.02 * rings
             - 0.2 * np.exp(-(((d - np.float32(r_groove)) / np.float32(1.1 * k)) ** 2))
             + 0.05 * np.exp(-(((d - np.float32(r_groove + 1.6 * k)) / np.float32(0.9 * k)) ** 2))
             - 0.08 * np.exp(-((d - np.float32(r_in)) / np.float32(2.0 * k)) ** 2))
    part_rgb = (shade * gain)[:, :, None] * np.array([1.0, 0.99, 0.97], np.float32)
    # Soft shadow cast onto the belt, offset away from the light.
    shadow = cv2.GaussianBlur(part, (0, 0), 2.0 * k)
    shift = np.float32([[1, 0, -2.5 * k * np.cos(light)], [0, 1, -2.5 * k * np.sin(light)]])
    shadow = cv2.warpAffine(shadow, shift, (s, s), borderMode=cv2.BORDER_CONSTANT)
    ground = background * (1.0 - 0.45 * shadow)[:, :, None]
    img = ground * (1.0 - part)[:, :, None] + part_rgb * part[:, :, None]
    img += 0.008 * rng.standard_normal((s, s, 3)).astype(np.float32)
    support = cv2.erode((part > 0.99).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return _Scene(np.clip(img, 0, 1).astype(np.float32), support, ground, part, (cx, cy), (r_out, r_in))


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "metal": _metal, "fabric": _fabric, "washer": _washer,
}


# --------------------------------------------------------------------------------------------------
# Defects: each returns (coverage (s, s) in [0, 1], target (s, s, 3)); the frame becomes
# image + coverage * (target - image)
# --------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, support: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(support)
    i = int(idx[rng.integers(idx.size)])
    s = support.shape[1]
    return np.array([i % s, i // s], dtype=np.float64) + rng.uniform(-0.5, 0.5, 2)


def _local_mean(img: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    wsum = float(alpha.sum())
    if wsum < 1e-6:
        return img.reshape(-1, 3).mean(axis=0)
    return (img * alpha[:, :, None]).reshape(-1, 3).sum(axis=0) / wsum


def _scratch(sc: _Scene, rng: np.random.Generator, k: float) -> tuple[np.ndarray, np.ndarray]:
    s = sc.image.shape[0]
    c = _pick(rng, sc.support)
    if sc.part is not None:
        # On a round part, handling scratches run roughly around it: an arc drifting slightly in radius.
        length = rng.uniform(0.18, 0.35) * s
        r0 = float(np.hypot(c[0] - sc.centre[0], c[1] - sc.centre[1]))
        a0 = float(np.arctan2(c[1] - sc.centre[1], c[0] - sc.centre[0]))
        ang = a0 + np.linspace(-0.5, 0.5, 24) * length / max(r0, 1.0)
        rad = r0 + np.linspace(-1.0, 1.0, 24) * rng.uniform(-0.04, 0.04) * s
        pts = np.stack([sc.centre[0] + rad * np.cos(ang), sc.centre[1] + rad * np.sin(ang)], axis=1)
    else:
        length = rng.uniform(0.2, 0.45) * s
        heading = rng.uniform(0, 2 * np.pi)
        half = 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
        normal = np.array([-np.sin(heading), np.cos(heading)])
        # Straight tool slips and curved handling arcs both occur.
        bend = normal * rng.uniform(-0.2, 0.2) * length
        pts = bezier(c - half, c + bend, c + half, 24)
    width = max(rng.uniform(1.3, 2.4) * k, 1.0)  # below a pixel a small frame would lose it
    taper = 0.45 + 0.55 * np.sin(np.linspace(0.1, np.pi - 0.1, len(pts)))
    alpha = stroke_alpha((s, s), [pts], [width * taper]) * sc.support
    local = _local_mean(sc.image, alpha)
    # Mostly bright (the groove catches the light), sometimes dark (filled with dirt or in shadow).
    if rng.random() < 0.7:
        colour = np.clip(local + rng.uniform(0.25, 0.4), 0, 1)
    else:
        colour = local * rng.uniform(0.25, 0.45)
    return alpha, np.broadcast_to(colour.astype(np.float32), sc.image.shape)


def _spot(sc: _Scene, rng: np.random.Generator, k: float) -> tuple[np.ndarray, np.ndarray]:
    s = sc.image.shape[0]
    c = _pick(rng, sc.support)
    radius = max(rng.uniform(4.5, 9.0) * k, 2.0)
    alpha = blob_alpha((s, s), (c[0], c[1]), radius, rng, aspect=rng.uniform(0.7, 1.4),
                       angle=rng.uniform(0, np.pi), roughness=rng.uniform(0.05, 0.25)) * sc.support
    local = _local_mean(sc.image, alpha)
    if rng.random() < 0.65:  # pits and burn marks are dark; weld spatter and residue are bright
        colour = local * rng.uniform(0.2, 0.45)
    else:
        colour = np.clip(local + rng.uniform(0.25, 0.4), 0, 1)
    # Keep a hint of the surface underneath, darkest/brightest at the centre.
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    r = np.sqrt((xx - np.float32(c[0])) ** 2 + (yy - np.float32(c[1])) ** 2) / np.float32(radius)
    strength = np.clip(1.05 - 0.3 * r, 0.75, 1.0)[:, :, None]
    target = sc.image + strength * (colour.astype(np.float32) - sc.image)
    return alpha, target


def _crack(sc: _Scene, rng: np.random.Generator, k: float) -> tuple[np.ndarray, np.ndarray]:
    s = sc.image.shape[0]
    start = _pick(rng, sc.support)
    paths, widths = crack_paths(rng, (start[0], start[1]), step=rng.uniform(3.5, 5.0) * k,
                                n_steps=int(rng.integers(7, 12)), width=max(rng.uniform(1.5, 2.4) * k, 1.1),
                                n_branches=int(rng.integers(1, 4)))
    alpha = stroke_alpha((s, s), paths, widths) * sc.support
    colour = _local_mean(sc.image, alpha) * rng.uniform(0.1, 0.3)
    return alpha, np.broadcast_to(colour.astype(np.float32), sc.image.shape)


def _missing(sc: _Scene, rng: np.random.Generator, k: float) -> tuple[np.ndarray, np.ndarray]:
    s = sc.image.shape[0]
    if sc.background is not None and sc.part is not None:
        # A chunk broken out of the outer rim (or the bore): the belt shows through.
        cx, cy = sc.centre
        r_edge = sc.radii[0] if rng.random() < 0.7 else sc.radii[1]
        a = rng.uniform(0, 2 * np.pi)
        c = (cx + r_edge * np.cos(a), cy + r_edge * np.sin(a))
        radius = rng.uniform(0.07, 0.12) * s
        if r_edge == sc.radii[1]:
            radius *= 0.8
        region = blob_alpha((s, s), c, radius, rng, aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi),
                            roughness=0.2, jag=rng.uniform(0.04, 0.1), soft=0.6)
        # Only material can go missing: where the part already was not, nothing changes.
        return region * sc.part, sc.background
    # A hole in the sheet or cloth: the dark backing shows through a torn, frayed edge.
    c = _pick(rng, sc.support)
    radius = max(rng.uniform(5.0, 10.0) * k, 2.5)
    alpha = blob_alpha((s, s), (c[0], c[1]), radius, rng, aspect=rng.uniform(0.6, 1.6),
                       angle=rng.uniform(0, np.pi), roughness=0.25, jag=rng.uniform(0.05, 0.15),
                       soft=0.6) * sc.support
    backing = rng.uniform(0.03, 0.08) + 0.015 * _smooth_noise(rng, s, 4 * k)
    target = np.repeat(backing[:, :, None], 3, axis=2)
    return alpha, target.astype(np.float32)


_STAINS = np.array([
    [0.62, 0.30, 0.12],  # rust
    [0.20, 0.15, 0.10],  # oil
    [0.36, 0.52, 0.22],  # green residue
    [0.22, 0.36, 0.62],  # blue coolant
    [0.80, 0.64, 0.22],  # yellow grease
], np.float32)


def _contamination(sc: _Scene, rng: np.random.Generator, k: float) -> tuple[np.ndarray, np.ndarray]:
    s = sc.image.shape[0]
    c = _pick(rng, sc.support)
    radius = max(rng.uniform(7.0, 13.0) * k, 3.0)
    aspect = rng.uniform(0.5, 1.0)
    a = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = xx - np.float32(c[0]), yy - np.float32(c[1])
    u = (dx * np.float32(np.cos(a)) + dy * np.float32(np.sin(a))) / np.float32(radius)
    v = (-dx * np.float32(np.sin(a)) + dy * np.float32(np.cos(a))) / np.float32(radius * aspect)
    # A stain spreads unevenly: an elliptical falloff broken up by noise gives a ragged, patchy outline.
    field = 1.0 - np.sqrt(u * u + v * v) + 0.3 * _smooth_noise(rng, s, 0.6 * radius)
    alpha = np.clip(field * 3.0, 0.0, 1.0) * sc.support
    colour = _STAINS[int(rng.integers(len(_STAINS)))] * np.float32(rng.uniform(0.85, 1.15))
    luma = sc.image.mean(axis=2, keepdims=True)
    mean_luma = max(float((luma[:, :, 0] * alpha).sum() / max(alpha.sum(), 1e-6)), 0.05)
    # Multiplying by the surface's own shading keeps the texture visible through the stain.
    stained = colour * np.clip(0.6 + 0.4 * luma / np.float32(mean_luma), 0.0, 1.6)
    strength = rng.uniform(0.75, 0.95)
    target = sc.image + strength * (np.clip(stained, 0, 1) - sc.image)
    return alpha, target.astype(np.float32)


_DEFECT_FNS = {
    "scratch": _scratch, "spot": _spot, "crack": _crack, "missing": _missing, "contamination": _contamination,
}


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check(product: str, defects: Sequence[str], size: int) -> None:
    if product not in PRODUCTS:
        raise DiffinspectError(f"unknown product {product!r}: choose from {', '.join(PRODUCTS)}")
    for d in defects:
        if d not in DEFECTS:
            raise DiffinspectError(f"unknown defect {d!r}: choose from {', '.join(DEFECTS)}")
    if int(size) < MIN_SIZE:
        raise DiffinspectError(f"size must be at least {MIN_SIZE} pixels, got {size}")


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_frame(product: str, rng: np.random.Generator, size: int = 128,
                 defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame of the line.

    Returns (uint8 RGB image (size, size, 3), uint8 mask (size, size) with 0/255; all zero when
    defect is None). The good part is drawn first, so the same rng state with and without a defect
    renders the same part, differing only around the defect.
    """
    _check(product, [defect] if defect is not None else [], size)
    size = int(size)
    scene = _RENDERERS[product](rng, size)
    if defect is None:
        return _to_u8(scene.image), np.zeros((size, size), np.uint8)
    k = size / 128
    alpha = target = None
    for _ in range(8):
        alpha, target = _DEFECT_FNS[defect](scene, rng, k)
        share = float((alpha >= _MASK_LEVEL).mean())
        if _AREA_RANGE[0] <= share <= _AREA_RANGE[1]:
            break
    # Eight misses in a row are vanishingly rare; the last draw is then kept (still non-empty in practice).
    mask = np.where(alpha >= _MASK_LEVEL, 255, 0).astype(np.uint8)
    # Faint specks and stroke tips below the mask level, away from the mask, would be unlabelled
    # defects: drop them, keeping only the anti-aliased fringe next to the mask.
    alpha = alpha * (cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0)
    img = scene.image + alpha[:, :, None] * (np.asarray(target, np.float32) - scene.image)
    return _to_u8(img), mask


def _write_png(path: Path, img: np.ndarray) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise DiffinspectError(f"could not encode {path}")
    try:
        path.write_bytes(buf.tobytes())
    except OSError as exc:
        raise DiffinspectError(f"cannot write {path}: {exc.strerror or exc}") from None


def make_line(root: Path, product: str = "metal", n_train: int = 60, n_test_good: int = 20,
              n_test_defect: int = 20, size: int = 128, seed: int = 0,
              defects: Sequence[str] = DEFECTS) -> Path:
    """Write a synthetic line in MVTec-AD layout and return root.

    root/train/good/000.png..., root/test/good/..., root/test/<defect>/... (n_test_defect split as
    evenly as possible over defects, earlier defects taking the remainder; a defect given no images
    gets no folder) and root/ground_truth/<defect>/<stem>_mask.png (0/255). Same arguments give
    byte-identical files. Each frame has its own generator seeded from (seed, product, split, defect,
    index), so changing one split's count does not change the images of another. Existing files with
    the same names are overwritten; other files under root are left alone.
    """
    defects = tuple(dict.fromkeys(defects))  # a repeated name would overwrite its own images
    _check(product, defects, size)
    if seed < 0:
        raise DiffinspectError(f"seed must not be negative, got {seed}")
    for name, n in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if n < 0:
            raise DiffinspectError(f"{name} must not be negative, got {n}")
    if n_test_defect and not defects:
        raise DiffinspectError("n_test_defect > 0 needs at least one defect type")
    root = Path(root)
    pid = PRODUCTS.index(product)

    def frames(folder: Path, split: int, defect: str | None, n: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        did = DEFECTS.index(defect) + 1 if defect else 0
        for i in range(n):
            rng = np.random.default_rng([seed, pid, split, did, i])
            img, mask = render_frame(product, rng, size, defect)
            _write_png(folder / f"{i:03d}.png", img)
            if defect:
                gt = root / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
                _write_png(gt / f"{i:03d}_mask.png", mask)

    frames(root / "train" / "good", 0, None, n_train)
    frames(root / "test" / "good", 1, None, n_test_good)
    if defects:
        base, extra = divmod(n_test_defect, len(defects))
        for j, defect in enumerate(defects):
            n = base + (1 if j < extra else 0)
            if n:
                frames(root / "test" / defect, 2, defect, n)
    return root
