"""Frame health: cheap per-frame signals that move when the camera or the lighting changes, and their
values on the good calibration frames (stored in the bundle, read by line/drift.py).

Frames are read at the scale `inspect watch` reads them (Preprocess.read_side: a large frame at 1/2 to 1/8,
a JPEG reduced by its DCT, any other format area-averaged alike), and the profile records that scale, so
the line's frames are measured as the calibration frames were whatever their format. A profile without it
(older bundles, tiles, an ROI) was fitted on whole frames, and watch then decodes whole.

Each signal is made to move for its own cause only (tests/test_drift.py checks that a change raises its
own alarm and no other). All from OpenCV on a gray copy of the frame, a few milliseconds on 5 MP:
- brightness: mean gray level (0-255) of a SMALL x SMALL copy of the view (see measure);
- contrast: mean gray level of the brighter half of the cells of a COARSE x COARSE copy minus that of
  the darker half: the levels of the scene's large areas, which focus blur and sensor noise (both
  fine-scale) barely move (the std of a finer copy drops when the frame is blurred);
- sharpness: log10 of the variance of the Laplacian over the variance of the image, per tile of a
  TILES x TILES grid of a copy whose longer side is at most SHARP_SIDE, median over the inner tiles.
  Dividing by the variance makes it independent of the gain (a darker frame is not "out of focus");
  the median over tiles keeps it to the typical detail of the surface, so a moved view (an edge
  entering or leaving a tile, new content at the border) does not read as blur;
- offset_x, offset_y: where the part's edges are, against where they were at calibration. The column
  (row) profile of horizontal (vertical) gradient energy of a PROFILE x PROFILE copy is aligned with
  the mean profile of the calibration frames; the offset is the displacement of best correlation, in
  whole pixels of PROFILE (a sub-pixel estimate would move with blur). A part pose shows in these
  profiles (tile edges, a screw's flanks, a fixture) even when the surface texture varies from part to
  part, which 2-D phase correlation cannot lock on;
- shift: their length as a fraction of the frame side (for display; the alarm tests the two offsets).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, BundleUpdate, Health, ScoreQuantile
from diffinspect.data.image import at_read_scale

HEALTH_FILE = "health.npz"
SMALL = 64  # brightness: coarse structure only, so blur barely moves it
COARSE = 8  # contrast: the scale of the lighting, far above that of focus
SHARP_SIDE = 512  # focus is judged near native resolution (a small copy would hide a slight blur)
TILES = 6  # sharpness grid; its outer ring is left out (new content enters there when the view moves)
PROFILE = 128  # pose profiles: enough rows to place an edge within a pixel or two of 1 %
MAX_OFFSET = 16  # of PROFILE: the largest move the offsets can read (12.5 % of the frame)
SIGNALS = ("brightness", "contrast", "sharpness", "offset_x", "offset_y", "shift")
SCORE_LEVEL = 0.8  # the score quantile shown in the manifest (the score-drift alarm uses every rank)
MIN_FRAMES = 20


def _work_gray(frame: np.ndarray) -> np.ndarray:
    """Gray copy with the longer side at most SHARP_SIDE: decimated first, then made gray, then area
    resampled, so a 5 MP colour frame costs no full-size pass and the slow area resampling one channel."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    step = max(frame.shape[:2]) // SHARP_SIDE
    if step > 1:  # decimation first (reads 1 pixel in step^2): area resampling of a 5 MP frame is slow
        h, w = frame.shape[:2]
        frame = cv2.resize(frame, (w // step, h // step), interpolation=cv2.INTER_NEAREST)
    if frame.ndim == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    scale = SHARP_SIDE / max(frame.shape[:2])
    if scale < 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return frame


def _resized(gray: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def _sharpness(gray: np.ndarray) -> float:
    h, w = gray.shape
    ys = [i * h // TILES for i in range(TILES + 1)]
    xs = [j * w // TILES for j in range(TILES + 1)]
    # Only the inner tiles count: the Laplacian of the inner block with a one-pixel rim, the same values
    # as over the whole copy there (its 3 x 3 kernel reads no further).
    y0, y1, x0, x1 = max(ys[1] - 1, 0), min(ys[-2] + 1, h), max(xs[1] - 1, 0), min(xs[-2] + 1, w)
    g = gray[y0:y1, x0:x1].astype(np.float32)
    lap = cv2.Laplacian(g, cv2.CV_32F)
    ratios = []
    for i in range(1, TILES - 1):
        for j in range(1, TILES - 1):
            tile = (slice(ys[i] - y0, ys[i + 1] - y0), slice(xs[j] - x0, xs[j + 1] - x0))
            ratios.append((_var(lap[tile]) + 1e-3) / (_var(g[tile]) + 1e-3))
    return math.log10(float(np.median(ratios)))


def _var(a: np.ndarray) -> float:
    return float(cv2.meanStdDev(a)[1][0, 0]) ** 2


def pose_profiles(gray: np.ndarray) -> np.ndarray:
    """(2, PROFILE): column profile of horizontal and row profile of vertical gradient energy, each
    divided by its mean (so gain and contrast do not move it)."""
    g = _resized(gray, PROFILE)
    cols = np.abs(cv2.Sobel(g, cv2.CV_32F, 1, 0)).mean(0)
    rows = np.abs(cv2.Sobel(g, cv2.CV_32F, 0, 1)).mean(1)
    return np.stack([cols / (cols.mean() + 1e-6), rows / (rows.mean() + 1e-6)])


def profile_offset(reference: np.ndarray, profile: np.ndarray) -> float:
    """Displacement (whole pixels) of profile against reference, within MAX_OFFSET:
    positive when the frame's content moved right (down). Every overlap is compared whole (the
    correlation of the overlapping parts, each centred), so edges near the frame border count."""
    n = profile.size
    a, b = np.asarray(reference, np.float64), np.asarray(profile, np.float64)
    shifts = np.arange(-MAX_OFFSET, MAX_OFFSET + 1)
    # For a shift s the overlap is a[i], b[i + s]; the sums over it from prefix sums, the products
    # from one cross-correlation, so all shifts cost a few vector operations.
    lo, hi = np.maximum(0, -shifts), n - np.maximum(0, shifts)
    length = hi - lo

    def window(x: np.ndarray, start: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(x)])
        return c[start + length] - c[start]

    sa, sb = window(a, lo), window(b, lo + shifts)
    saa, sbb = window(a * a, lo), window(b * b, lo + shifts)
    sab = np.correlate(b, a, "full")[n - 1 + shifts]
    cov = sab - sa * sb / length
    corr = cov / np.sqrt((saa - sa * sa / length) * (sbb - sb * sb / length) + 1e-12)
    return float(int(corr.argmax()) - MAX_OFFSET)


def measure(frame: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """The signals of one frame; the offsets and shift are NaN without a reference (pose profiles).

    Brightness, contrast and sharpness are measured on the part of the view the calibration frames
    showed: a window MAX_OFFSET in from every side, moved by the frame's offsets. So a moved camera
    (the part elsewhere in the frame, new surroundings at the border) reads as "camera moved" only."""
    gray = _work_gray(frame)
    out = {"offset_x": math.nan, "offset_y": math.nan, "shift": math.nan}
    dx = dy = 0.0
    if reference is not None:
        prof = pose_profiles(gray)
        dx, dy = profile_offset(reference[0], prof[0]), profile_offset(reference[1], prof[1])
        out.update(offset_x=dx, offset_y=dy, shift=math.hypot(dx, dy) / PROFILE)
    h, w = gray.shape
    my, mx = h * MAX_OFFSET // PROFILE, w * MAX_OFFSET // PROFILE
    y0 = min(max(my + round(dy * h / PROFILE), 0), 2 * my)  # |offset| <= MAX_OFFSET: clipping only rounds
    x0 = min(max(mx + round(dx * w / PROFILE), 0), 2 * mx)
    view = gray[y0:y0 + h - 2 * my, x0:x0 + w - 2 * mx]
    cells = np.sort(_resized(view, COARSE).ravel())
    half = cells.size // 2
    out.update(brightness=float(_resized(view, SMALL).mean()), sharpness=_sharpness(view),
               contrast=float(cells[half:].mean() - cells[:half].mean()))
    return out


@dataclass
class HealthProfile:
    """What calibration learnt about good frames (see the module docstring)."""

    values: dict[str, np.ndarray]  # signal -> calibration values
    reference: np.ndarray  # (2, PROFILE) mean pose profiles of the calibration frames
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # detector name -> calibration scores
    read_side: int | None = None  # the min_side its frames were read at (None: whole); see the module docstring

    def bands(self) -> dict[str, tuple[float, float]]:
        """Range of each signal on the good calibration frames (1 % and 99 % quantiles), for display."""
        out = {}
        for name, v in self.values.items():
            v = v[np.isfinite(v)]
            if v.size:
                lo, hi = np.percentile(v, [1.0, 99.0])
                out[name] = (float(lo), float(hi))
        return out

    def record(self) -> Health:
        """The profile's manifest section (the arrays go to HEALTH_FILE)."""
        quant = {d: ScoreQuantile(SCORE_LEVEL, float(np.quantile(s, SCORE_LEVEL)), int(s.size))
                 for d, s in self.scores.items() if s.size >= MIN_FRAMES}
        return Health(HEALTH_FILE, int(self.values["brightness"].size), self.bands(), quant, self.read_side)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"value_{k}": np.asarray(v, np.float64) for k, v in self.values.items()}
        arrays.update({f"score_{k}": np.asarray(v, np.float64) for k, v in self.scores.items()})
        np.savez(buf, reference=self.reference.astype(np.float32), **arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Any) -> HealthProfile:
        try:
            with np.load(path, allow_pickle=False) as z:
                values = {k[6:]: z[k] for k in z.files if k.startswith("value_")}
                scores = {k[6:]: z[k] for k in z.files if k.startswith("score_")}
                reference = z["reference"].astype(np.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DiffinspectError(f"bundle health profile unreadable ({exc}): run `inspect calibrate` again") from None
        if reference.shape != (2, PROFILE) or not set(SIGNALS) <= set(values):
            raise DiffinspectError("bundle health profile has an older or unexpected layout: run `inspect calibrate` "
                                   "again for drift alarms")
        return cls(values, reference, scores)


def fit_health(frames: list[np.ndarray], scores: Mapping[str, np.ndarray] | None = None,
               read_side: int | None = None) -> HealthProfile | None:
    """Calibrate health signals on good frames decoded whole, each read at read_side first (what
    decode_image(min_side=read_side) gives on the line); None when there are too few frames to say anything."""
    if len(frames) < MIN_FRAMES:
        return None
    frames = [at_read_scale(f, read_side) for f in frames]
    reference = np.mean([pose_profiles(_work_gray(f)) for f in frames], axis=0).astype(np.float32)
    rows = [measure(f, reference) for f in frames]
    return HealthProfile({k: np.asarray([r[k] for r in rows], np.float64) for k in SIGNALS}, reference,
                         {k: np.asarray(v, np.float64) for k, v in (scores or {}).items()}, read_side)


def save_health(update: BundleUpdate, profile: HealthProfile | None) -> None:
    """Write the profile into a bundle being updated (BundleUpdate), or drop a stale one."""
    if profile is None:
        update.remove_file(HEALTH_FILE)
        update.manifest.health = None
        return
    update.write_bytes(HEALTH_FILE, profile.to_bytes())
    update.manifest.health = profile.record()


def load_health(bundle: Bundle) -> HealthProfile | None:
    """The bundle's health profile (a verified file), or None for bundles calibrated without one."""
    section = bundle.manifest.health
    if section is None or not bundle.has(HEALTH_FILE):  # the name is fixed: never from the manifest
        return None
    profile = HealthProfile.from_file(bundle.file(HEALTH_FILE))
    profile.read_side = section.read_side
    return profile
