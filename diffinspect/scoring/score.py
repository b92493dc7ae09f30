"""Scoring files: one result record per image, errors included, overlays on request."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from diffinspect.data.datasets import list_images
from diffinspect.data.image import ImageError, read_image
from diffinspect.scoring.inspector import Inspector, Verdict, failed
from diffinspect.scoring.overlay import overlay_name, save_overlay, wants_overlay
from diffinspect.scoring.record import Record

READ_AHEAD = 8  # images decoded at a time: bounds the frames in memory, not how the model batches


def expand_paths(paths: list[Path]) -> list[Path]:
    """Folders become the images under them; files are kept as given (so bad files get a record)."""
    out: list[Path] = []
    for p in paths:
        out.extend(list_images(p) if p.is_dir() else [p])
    return out


def score_paths(inspector: Inspector, paths: list[Path], overlay_dir: Path | None = None,
                overlays: str = "all") -> Iterator[Record]:
    """Yield one Record per path, in order. overlays: all | ng | none (only with overlay_dir)."""
    for i in range(0, len(paths), READ_AHEAD):
        chunk = paths[i:i + READ_AHEAD]
        frames, good = [], []
        for p in chunk:
            try:
                frames.append(read_image(p, inspector.preprocess.color))
                good.append(p)
            except ImageError as exc:
                yield _record(inspector, p, failed(str(exc)))
        if not frames:
            continue
        t0 = time.perf_counter()
        verdicts = inspector.inspect(frames)
        latency = round((time.perf_counter() - t0) * 1000 / len(frames), 2)
        for p, frame, v in zip(good, frames, verdicts, strict=True):
            overlay = None
            if overlay_dir is not None and wants_overlay(overlays, v.label):
                st = os.stat(p)
                target = overlay_dir / overlay_name(os.path.abspath(p), st.st_size, st.st_mtime_ns)
                overlay = str(save_overlay(target, frame, v.map, v.score, inspector.threshold, v.label,
                                           inspector.pixel_threshold))
            yield _record(inspector, p, v, latency_ms=latency, overlay=overlay)


def _record(inspector: Inspector, path: Path, v: Verdict, latency_ms: float | None = None,
            overlay: str | None = None) -> Record:
    ok = v.label != "error"
    return Record(path=str(path), status=v.label, score=v.score if ok else None, threshold=inspector.threshold,
                  detector=inspector.name, backend=inspector.backend, latency_ms=latency_ms, overlay=overlay,
                  error=v.error, p_value=v.p_value, bundle_version=inspector.version)
