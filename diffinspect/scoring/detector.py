"""The one contract every detector keeps: the diffusion backends and the COPOD fallback alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from diffinspect.data.image import Preprocess

if TYPE_CHECKING:
    from diffinspect.scoring.health import HealthProfile


@dataclass
class Scored:
    """Scores of a batch: maps in calibrated z-units, (N, S, S) float32 for whole frames, a list of one
    canvas map per frame (shapes vary with the frames) when fed as tiles, None for COPOD."""

    scores: np.ndarray
    maps: np.ndarray | list[np.ndarray] | None


class Detector(Protocol):
    name: str  # "diffusion" | "copod"
    backend: str  # e.g. "torch:cpu", "onnxruntime:CPUExecutionProvider", "openvino:CPU", "copod"
    threshold: float  # image score above which a frame is NG
    pixel_threshold: float | None  # map value above which a pixel is outlined in overlays
    preprocess: Preprocess
    health: HealthProfile | None  # what calibration learnt about good frames, for drift alarms; None: none

    def score(self, frames: list[np.ndarray]) -> Scored:
        """Score decoded uint8 (H, W, C) frames of any size; preprocessing happens inside."""
        ...


def label_for(score: float, threshold: float) -> str:
    """The threshold rule, in one place: strictly above the threshold is NG; a score or threshold that is
    not a finite number is an error, never OK (`NaN > threshold` is false)."""
    if unscorable(score, threshold):
        return "error"
    return "ng" if score > threshold else "ok"


def unscorable(score: float, threshold: float) -> str | None:
    """Why a frame's score cannot be labelled (the reason an error record gives), or None."""
    if not math.isfinite(threshold):
        return f"the threshold is not a finite number ({threshold})"
    if not math.isfinite(score):
        return f"the score is not a finite number ({score}): the model or its calibration statistics are broken"
    return None
