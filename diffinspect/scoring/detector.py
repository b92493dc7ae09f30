"""The one contract every detector keeps: the diffusion backends and the COPOD fallback alike. Scores
become verdicts in one place, the Inspector (inspector.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # The detector's own p-values where its rule defines them (the minp fused rule), else None: the
    # Inspector then ranks the scores among the bundle's calibration scores.
    p_values: np.ndarray | None = None
    # The detector's time on this batch by stage (scoring/stages.py names), for the run's stage clock.
    seconds: dict[str, float] = field(default_factory=dict)


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
