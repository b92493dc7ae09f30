"""The Inspector: frames in, verdicts out. The one place where a detector's scores become labels, for
`inspect score`, the lanes of `inspect watch` and `inspect evaluate` alike.

It runs the detector on a list of decoded frames and, for each frame, checks that the detector gave it
one score that is a finite number, applies the threshold rule, puts the conformal p-value beside the
score and the anomaly map back on the frame's own pixel grid. A frame it cannot label gets an `error`
verdict that says why: never `ok`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from diffinspect.bundle import Bundle
from diffinspect.data.image import Preprocess
from diffinspect.scoring.detector import Detector
from diffinspect.scoring.stages import MAP, MODEL, StageClock


def unscorable(score: float | None, threshold: float) -> str | None:
    """Why a frame's score cannot be labelled (what its error verdict says), or None."""
    if not math.isfinite(threshold):
        return f"the threshold is not a finite number ({threshold})"
    if score is None or not math.isfinite(score):
        return f"the score is not a finite number ({score}): the model or its calibration statistics are broken"
    return None


def label_for(score: float | None, threshold: float) -> str:
    """The threshold rule: strictly above the threshold is NG; a score or threshold that is not a finite
    number is an error, never OK (`NaN > threshold` is false)."""
    if unscorable(score, threshold):
        return "error"
    return "ng" if score > threshold else "ok"


def conformal_p(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Split-conformal p-values, (1 + #{calibration >= s}) / (n + 1): for a good part exchangeable with
    the calibration parts, P(p <= alpha) <= alpha, the same bound as the conformal threshold."""
    cal = np.sort(np.asarray(calibration, np.float64).ravel())
    at_least = cal.size - np.searchsorted(cal, np.asarray(scores, np.float64), side="left")
    return (1 + at_least) / (cal.size + 1)


@dataclass(eq=False)
class Verdict:
    """One frame's verdict. `score` is what the detector gave (None when it gave this frame none, i.e.
    the detector failed on the batch; NaN or inf kept as they came, with label error)."""

    label: str  # ok | ng | error
    score: float | None
    p_value: float | None  # None without calibration scores, and for error verdicts
    error: str | None  # why the label is error
    grid_map: np.ndarray | None = None  # the detector's own map (model grid, or tiles canvas)
    frame_shape: tuple[int, ...] | None = None
    preprocess: Preprocess | None = None

    @cached_property
    def map(self) -> np.ndarray | None:
        """The anomaly map on the frame's pixel grid (ROI, crop, pad undone), in calibrated z-units; made
        on first use, as most verdicts on a line never need one."""
        if self.grid_map is None or self.preprocess is None or self.frame_shape is None:
            return None
        return self.preprocess.map_to_frame(np.asarray(self.grid_map, np.float32), self.frame_shape)


def failed(reason: str) -> Verdict:
    """The verdict of a frame no detector could score (unreadable, or every detector failed)."""
    return Verdict("error", None, None, reason)


class Inspector:
    """A detector (the diffusion model on a backend, or the COPOD fallback) with the rules that turn its
    scores into verdicts. calibration_scores: the good parts' scores the p-values rank a score among."""

    def __init__(self, detector: Detector, calibration_scores: np.ndarray | None = None) -> None:
        """calibration_scores: None takes the detector's own (the loader sets them from the bundle)."""
        self.detector = detector
        if calibration_scores is None:
            calibration_scores = getattr(detector, "calibration_scores", None)
        cal = None if calibration_scores is None else np.sort(np.asarray(calibration_scores, np.float64).ravel())
        self.calibration_scores = cal if cal is not None and cal.size else None
        self.bundle: Path | None = None  # the bundle it was loaded from, and that bundle's version
        self.version: int | None = None

    @classmethod
    def load(cls, bundle: str | Path | Bundle, backend: str = "auto", device: str = "auto",
             sampler: str | None = None, detector: str = "diffusion") -> Inspector:
        """The bundle's calibrated detector (diffusion | copod; a bundle without a model has only the
        fallback) with the bundle's calibration scores."""
        from diffinspect.scoring.loader import load_detector  # lazy: pulls in the backends

        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        det = load_detector(b, detector, backend, device, sampler)
        return cls(det, getattr(det, "calibration_scores", None))._from(b)

    @classmethod
    def fallback(cls, bundle: str | Path | Bundle) -> Inspector:
        """The bundle's COPOD fallback, with its calibration scores (none in a bundle calibrated before
        they were kept: no p-values then)."""
        from diffinspect.scoring.loader import load_fallback

        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        det = load_fallback(b)
        return cls(det, det.calibration_scores)._from(b)

    def _from(self, bundle: Bundle) -> Inspector:
        self.bundle, self.version = bundle.path, bundle.version
        return self

    @property
    def name(self) -> str:
        return self.detector.name

    @property
    def backend(self) -> str:
        return self.detector.backend

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold)

    @property
    def pixel_threshold(self) -> float | None:
        return self.detector.pixel_threshold

    @property
    def preprocess(self) -> Preprocess:
        return self.detector.preprocess

    @property
    def guarantee(self) -> str | None:
        """What the threshold guarantees, in one line (None for a detector that does not say)."""
        return getattr(self.detector, "guarantee", None)

    @property
    def health(self):  # noqa: ANN201 (HealthProfile | None: what drift alarms compare frames to)
        return getattr(self.detector, "health", None)

    def inspect(self, frames: list[np.ndarray], clock: StageClock | None = None,
                shapes: list[tuple[int, ...] | None] | None = None) -> list[Verdict]:
        """One verdict per frame, in order. Frames: decoded uint8 (H, W, C) in `preprocess.color`, any
        size. The detector's exceptions propagate (the caller decides: stop, or switch detector).
        clock: gets this batch's time by stage. shapes: each frame's own shape where it was decoded
        smaller (a reduced JPEG decode), so its map comes back on its own pixel grid."""
        if not frames:
            return []
        t0 = time.perf_counter()
        scored = self.detector.score(frames)
        t1 = time.perf_counter()
        scores = np.asarray(scored.scores, np.float64).reshape(-1)
        if scores.shape[0] != len(frames):
            why = f"the {self.name} detector returned {scores.shape[0]} scores for {len(frames)} frames"
            return [failed(why) for _ in frames]
        maps = scored.maps if scored.maps is not None and len(scored.maps) == len(frames) else None
        p_values = self._p_values(scores, getattr(scored, "p_values", None))
        verdicts = []
        for i, frame in enumerate(frames):
            score = float(scores[i])
            why = unscorable(score, self.threshold)
            verdicts.append(Verdict(
                label_for(score, self.threshold), score, None if why or p_values is None else float(p_values[i]),
                why, None if maps is None else maps[i], (shapes and shapes[i]) or frame.shape, self.preprocess))
        if clock is not None:
            own = getattr(scored, "seconds", {})
            clock.add_all(own)
            # What the detector does not split itself (all of the COPOD fallback's time) is its model's.
            clock.add(MODEL, t1 - t0 - sum(own.values()))
            clock.add(MAP, time.perf_counter() - t1)
        return verdicts

    def _p_values(self, scores: np.ndarray, own: np.ndarray | None) -> np.ndarray | None:
        """The detector's own p-values where its rule defines them (the minp fused rule), else the
        split-conformal p-value among the calibration scores, else None."""
        if own is not None:
            return np.asarray(own, np.float64).reshape(-1)
        return None if self.calibration_scores is None else conformal_p(self.calibration_scores, scores)

