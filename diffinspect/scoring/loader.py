"""Loading a detector from a bundle: the diffusion model on a chosen backend, or the COPOD fallback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.scoring.detector import Detector

if TYPE_CHECKING:
    from diffinspect.scoring.health import HealthProfile
from diffinspect.vocab import Detector as DetectorName

log = logging.getLogger(__name__)


def _bundle(bundle: str | Path | Bundle) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)


def load_detector(bundle: str | Path | Bundle, detector: str = "diffusion", backend: str = "auto",
                  device: str = "auto", sampler: str | None = None) -> Detector:
    """A calibrated detector from a bundle. detector: "diffusion" | "copod"."""
    if detector not in DetectorName.values():
        raise DiffinspectError(f"unknown detector {detector!r}: choose diffusion or copod")
    b = _bundle(bundle)
    if detector == "copod" or b.manifest.model is None:
        return load_fallback(b)
    from diffinspect.engines.select import make_engine
    from diffinspect.scoring.diffusion import CALIBRATION_FILE, DiffusionDetector, FrameTerm, Stats

    cal = b.manifest.calibration
    if cal is None:
        raise DiffinspectError(f"bundle {b.path} was never calibrated: run `inspect calibrate {b.path}`")
    z = b.arrays(CALIBRATION_FILE, {"mean": None, "std": None})
    if z["mean"].ndim != 3 or z["mean"].shape != z["std"].shape:  # (terms, S, S) per-pixel statistics
        raise DiffinspectError(f"bundle file {CALIBRATION_FILE} in {b.path} holds statistics of shapes "
                               f"{z['mean'].shape} and {z['std'].shape}: recalibrate the bundle")
    stats = Stats(z["mean"], z["std"])
    fused = (z["fusion_diffusion"], z["fusion_copod"]) if "fusion_diffusion" in z else None
    engine = make_engine(b, backend, device, sampler or cal.sampler)
    term = cal.frame_term
    frame_term = (FrameTerm(load_fallback(b), term.weight, term.diffusion, term.copod, term.rule,
                            fused if term.rule == "minp" else None, term.detector)
                  if term else None)
    det = DiffusionDetector(engine, b.manifest.preprocess, stats, cal.threshold, cal.pixel_threshold, cal.n,
                            cal.false_reject_rate, frame_term=frame_term)
    det.health = _health(b)
    det.calibration_scores = _calibration_scores(z)
    det.confidence = cal.confidence
    return det


def load_fallback(bundle: str | Path | Bundle) -> Detector:
    """The COPOD fallback stored in a bundle (classical features; never needs torch or an accelerator)."""
    from diffinspect.scoring.copod import SCORES_FILE, CopodDetector, load_scores

    b = _bundle(bundle)
    record = b.manifest.fallback
    if record is None:
        raise DiffinspectError(f"bundle {b.path} has no COPOD fallback: run `inspect calibrate {b.path}`")
    det = CopodDetector.load(b.file(record.file), record, b.manifest.preprocess)
    if b.has(SCORES_FILE):  # absent from bundles calibrated before the fallback kept them
        det.calibration_scores = load_scores(b.file(SCORES_FILE), det.n_calibration)
    det.health = _health(b)
    return det


def _health(b: Bundle) -> HealthProfile | None:
    """The bundle's health profile for drift alarms; a bundle without one (or with an unreadable one)
    scores all the same, only without drift alarms."""
    from diffinspect.scoring.health import load_health

    try:
        return load_health(b)
    except DiffinspectError as exc:
        log.warning(f"no drift alarms for {b.path}: {exc}")
        return None


def _calibration_scores(z: dict) -> np.ndarray | None:
    """The calibration parts' scores stored by `inspect calibrate` (the fused scores where the bundle
    fuses a frame term), or None for a bundle calibrated before they were kept."""
    scores = np.asarray(z.get("scores", []), np.float64).ravel()
    return scores if scores.size and np.isfinite(scores).all() else None
