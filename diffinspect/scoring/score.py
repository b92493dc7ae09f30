"""Scoring files: one result record per image, errors included, overlays on request."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from diffinspect.data.datasets import list_images
from diffinspect.data.image import ImageError, read_image
from diffinspect.scoring.detector import Detector, label_for, unscorable


@dataclass
class Record:
    path: str
    score: float | None
    threshold: float
    label: str  # ok | ng | error
    detector: str
    backend: str
    latency_ms: float | None
    overlay: str | None
    error: str | None

    def to_dict(self) -> dict:
        """Plain JSON values: a number that is not finite becomes null (NaN is not JSON)."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


def expand_paths(paths: list[Path]) -> list[Path]:
    """Folders become the images under them; files are kept as given (so bad files get a record)."""
    out: list[Path] = []
    for p in paths:
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


def score_paths(detector: Detector, paths: list[Path], overlay_dir: Path | None = None,
                overlays: str = "all", batch_size: int = 8) -> Iterator[Record]:
    """Yield one Record per path, in order. overlays: all | ng | none (only with overlay_dir)."""
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        frames, good = [], []
        for p in chunk:
            try:
                frames.append(read_image(p, detector.preprocess.color))
                good.append(p)
            except ImageError as exc:
                yield Record(str(p), None, detector.threshold, "error", detector.name, detector.backend,
                             None, None, str(exc))
        if not frames:
            continue
        t0 = time.perf_counter()
        result = detector.score(frames)
        latency = (time.perf_counter() - t0) * 1000 / len(frames)
        for j, (p, frame) in enumerate(zip(good, frames, strict=True)):
            score = float(result.scores[j])
            why = unscorable(score, detector.threshold)
            if why is not None:
                yield Record(str(p), None, detector.threshold, "error", detector.name, detector.backend,
                             round(latency, 2), None, why)
                continue
            label = label_for(score, detector.threshold)
            overlay = None
            if overlay_dir is not None and (overlays == "all" or (overlays == "ng" and label == "ng")):
                overlay = str(_write_overlay(overlay_dir, p, frame, result.maps[j] if result.maps is not None
                                             else None, score, detector, label))
            yield Record(str(p), score, detector.threshold, label, detector.name, detector.backend,
                         round(latency, 2), overlay, None)


def _write_overlay(folder: Path, path: Path, frame, amap, score: float, detector: Detector, label: str) -> Path:
    from diffinspect.scoring.overlay import render_overlay, write_overlay

    if amap is not None:
        amap = detector.preprocess.map_to_frame(amap, frame.shape)
    image = render_overlay(frame, amap, score, detector.threshold, label, detector.pixel_threshold)
    target = folder / f"{path.stem}_{label}.png"
    write_overlay(target, image)
    return target
