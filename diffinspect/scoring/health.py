"""Frame health: cheap per-frame signals that move when the camera or the lighting changes, and their
calibrated ranges on good parts (stored in the bundle, read by line/drift.py).

Signals, all from OpenCV on a gray copy of the frame, a few milliseconds on a 5 MP frame:
- brightness: mean gray level (0-255) of a SMALL x SMALL copy;
- contrast: its standard deviation;
- sharpness: log10 of the variance of the Laplacian divided by the variance of the image, on a copy
  whose longer side is at most SHARP_SIDE. Dividing by the image variance makes it independent of the
  gain: a darker frame is not "out of focus", a blurred one is;
- shift: the frame's translation against the reference frame (mean of good frames) by phase
  correlation, as a fraction of the frame side. Per frame this is noisy when parts vary (each part
  has its own texture); the drift monitor therefore tests the mean of a window of frames, in which the
  common structure of the field of view (fixture, part edges, vignetting) emerges.

Calibration keeps the signal values of the good calibration frames (for rank tests on a window of
line frames), a reference frame, the null distribution of the window-mean alignment (resampled
windows of good frames held out from the reference), and the calibration score distribution per
detector (for the score-drift test).
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
from diffinspect.bundle import Alignment, Bundle, BundleUpdate, Health, ScoreQuantile

HEALTH_FILE = "health.npz"
SMALL = 64  # brightness, contrast and alignment: coarse structure only, so blur barely moves them
SHARP_SIDE = 512  # focus is judged near native resolution (a small copy would hide a slight blur)
SIGNALS = ("brightness", "contrast", "sharpness", "shift")
WINDOW = 50  # frames per drift window
SCORE_LEVEL = 0.8  # the score-drift test watches the share of OK parts above the 80 % calibration quantile
NULL_WINDOWS = 2000  # resampled windows for the alignment null
MIN_FRAMES = 20


def small_gray(frame: np.ndarray) -> np.ndarray:
    """float32 (SMALL, SMALL) gray copy in 0-255 of a uint8 (H, W), (H, W, 1) or (H, W, 3) RGB frame."""
    return _small(_work_gray(frame))


def _small(gray: np.ndarray) -> np.ndarray:
    return cv2.resize(gray, (SMALL, SMALL), interpolation=cv2.INTER_AREA).astype(np.float32)


def _work_gray(frame: np.ndarray) -> np.ndarray:
    """Gray copy with the longer side at most SHARP_SIDE: shrunk first, so a 5 MP colour frame costs
    one resize, not a full-size colour conversion."""
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    step = max(frame.shape[:2]) // SHARP_SIDE
    if step > 1:  # decimation first (reads 1 pixel in step^2); area resampling of a 5 MP frame costs tens of ms
        h, w = frame.shape[:2]
        frame = cv2.resize(frame, (w // step, h // step), interpolation=cv2.INTER_NEAREST)
    scale = SHARP_SIDE / max(frame.shape[:2])
    if scale < 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    if frame.ndim == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return frame


def sharpness(frame: np.ndarray) -> float:
    return _sharpness(_work_gray(frame))


def _sharpness(gray: np.ndarray) -> float:
    g = gray.astype(np.float32)
    var = float(g.var())
    lap = float(cv2.Laplacian(g, cv2.CV_32F).var())
    return math.log10((lap + 1e-3) / (var + 1e-3))


def align(reference: np.ndarray, small: np.ndarray) -> tuple[float, float, float]:
    """(dx, dy, response) of small against reference by phase correlation (pixels of SMALL)."""
    a = reference - reference.mean()
    b = small - small.mean()
    (dx, dy), response = cv2.phaseCorrelate(a.astype(np.float64), b.astype(np.float64))
    return float(dx), float(dy), float(response)


def measure(frame: np.ndarray, reference: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray]:
    """(signals, small gray copy) of one frame; shift is NaN without a reference."""
    gray = _work_gray(frame)
    small = _small(gray)
    shift = math.nan
    if reference is not None:
        dx, dy, _ = align(reference, small)
        shift = math.hypot(dx, dy) / SMALL
    return ({"brightness": float(small.mean()), "contrast": float(small.std()), "sharpness": _sharpness(gray),
             "shift": shift}, small)


@dataclass
class HealthProfile:
    """What calibration learnt about good frames (see the module docstring)."""

    values: dict[str, np.ndarray]  # signal -> calibration values (brightness, contrast, sharpness, shift)
    reference: np.ndarray  # (SMALL, SMALL) float32
    window: int
    offset_sigma: float  # Rayleigh scale (pixels of SMALL) of good windows' mean-frame offset
    align_mean: float  # their mean phase-correlation response (shown, not tested)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # detector name -> calibration scores

    def bands(self) -> dict[str, tuple[float, float]]:
        """Range of each signal on the good calibration frames (1 % and 99 % quantiles), for display."""
        out = {}
        for name, v in self.values.items():
            v = v[np.isfinite(v)]
            if v.size:
                lo, hi = np.percentile(v, [1.0, 99.0])
                out[name] = (float(lo), float(hi))
        return out

    def score_quantile(self, detector: str) -> tuple[float, int, int] | None:
        """(calibration score quantile at SCORE_LEVEL, its rank from the top r, n) for a detector."""
        s = self.scores.get(detector)
        if s is None or s.size < MIN_FRAMES:
            return None
        s = np.sort(s)
        n = s.size
        k = min(n, math.ceil((n + 1) * SCORE_LEVEL))  # conformal rank: P(new > s_(k)) <= 1 - k/(n+1)
        return float(s[k - 1]), n + 1 - k, n

    def record(self) -> Health:
        """The profile's manifest section (the arrays go to HEALTH_FILE)."""
        quant = {d: ScoreQuantile(SCORE_LEVEL, q[0], q[2])
                 for d in self.scores if (q := self.score_quantile(d)) is not None}
        return Health(HEALTH_FILE, int(self.values["brightness"].size), self.window, self.bands(),
                      Alignment(self.offset_sigma, self.align_mean), quant)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {f"value_{k}": np.asarray(v, np.float64) for k, v in self.values.items()}
        arrays.update({f"score_{k}": np.asarray(v, np.float64) for k, v in self.scores.items()})
        np.savez(buf, reference=self.reference.astype(np.float32), **arrays)
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Any, section: Health) -> HealthProfile:
        try:
            with np.load(path, allow_pickle=False) as z:
                values = {k[6:]: z[k] for k in z.files if k.startswith("value_")}
                scores = {k[6:]: z[k] for k in z.files if k.startswith("score_")}
                reference = z["reference"].astype(np.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DiffinspectError(f"bundle health profile unreadable ({exc}): run `inspect calibrate` again") from None
        if reference.shape != (SMALL, SMALL) or not set(SIGNALS) <= set(values):
            raise DiffinspectError("bundle health profile has an unexpected layout: run `inspect calibrate` again")
        # window and the alignment scale are checked by the manifest's types and bounds
        return cls(values, reference, section.window, section.alignment.offset_sigma, section.alignment.response,
                   scores)


def fit_health(frames: list[np.ndarray], scores: Mapping[str, np.ndarray] | None = None, window: int = WINDOW,
               seed: int = 0) -> HealthProfile | None:
    """Calibrate health signals on good frames; None when there are too few frames to say anything."""
    if len(frames) < MIN_FRAMES:
        return None
    rng = np.random.default_rng(seed)
    smalls = np.stack([small_gray(f) for f in frames])
    # The reference comes from one half, the alignment null from the other: a window of the frames the
    # reference was averaged from would align better than any new window does.
    order = rng.permutation(len(frames))
    ref_idx, null_idx = order[: len(frames) // 2], order[len(frames) // 2:]
    reference = smalls[ref_idx].mean(axis=0).astype(np.float32)
    held = smalls[null_idx].astype(np.float64)
    null = np.array([align(reference, held[rng.integers(0, len(held), window)].mean(axis=0))
                     for _ in range(NULL_WINDOWS)])
    # Offsets of good windows: a 2-D spread per axis (the Rayleigh scale of their length).
    sigma = float(np.sqrt(np.mean(null[:, 0] ** 2 + null[:, 1] ** 2) / 2))
    values: dict[str, list[float]] = {k: [] for k in SIGNALS}
    for f in frames:
        sig, _ = measure(f, reference)
        for k in SIGNALS:
            values[k].append(sig[k])
    return HealthProfile({k: np.asarray(v) for k, v in values.items()}, reference, window, max(sigma, 1e-3),
                         float(null[:, 2].mean()),
                         {k: np.asarray(v, np.float64) for k, v in (scores or {}).items()})


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
    return HealthProfile.from_file(bundle.file(HEALTH_FILE), section)
