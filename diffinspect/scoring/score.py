"""Scoring files: one result record per image, errors included, overlays on request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffinspect.data.datasets import list_images
from diffinspect.data.image import ImageError, read_image
from diffinspect.scoring.detector import Detector, label_for, unscorable
from diffinspect.scoring.overlay import save_overlay
from diffinspect.scoring.record import Record


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
                yield _record(detector, p, "error", error=str(exc))
        if not frames:
            continue
        t0 = time.perf_counter()
        result = detector.score(frames)
        latency = round((time.perf_counter() - t0) * 1000 / len(frames), 2)
        for j, (p, frame) in enumerate(zip(good, frames, strict=True)):
            score = float(result.scores[j])
            why = unscorable(score, detector.threshold)
            if why is not None:  # never labelled: NaN > threshold is false, which would read as OK
                yield _record(detector, p, "error", latency_ms=latency, error=why)
                continue
            label = label_for(score, detector.threshold)
            overlay = None
            if overlay_dir is not None and (overlays == "all" or (overlays == "ng" and label == "ng")):
                amap = result.maps[j] if result.maps is not None else None
                overlay = str(_write_overlay(overlay_dir / f"{p.stem}_{label}.png", frame, amap, score, detector,
                                             label))
            yield _record(detector, p, label, score=score, latency_ms=latency, overlay=overlay)


def _record(detector: Detector, path: Path, label: str, **kw: object) -> Record:
    base = dict(score=None, latency_ms=None, overlay=None, error=None)
    return Record(path=str(path), status=label, threshold=detector.threshold, detector=detector.name,
                  backend=detector.backend, **{**base, **kw})


def _write_overlay(target: Path, frame: np.ndarray, amap: np.ndarray | None, score: float, detector: Detector,
                   label: str) -> Path:
    if amap is not None:  # back onto the frame's pixel grid (ROI, crop, pad undone)
        amap = detector.preprocess.map_to_frame(amap, frame.shape)
    return save_overlay(target, frame, amap, score, detector.threshold, label, detector.pixel_threshold)
