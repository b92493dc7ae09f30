"""A COPOD-only bundle from good images alone: a line can be inspected before any model is trained."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from diffinspect import bundle as bundle_io
from diffinspect.bundle import Manifest, Training
from diffinspect.data.datasets import normal_images
from diffinspect.data.image import Preprocess, choose_color
from diffinspect.data.reading import read_images
from diffinspect.scoring.health import HEALTH_FILE, fit_health
from diffinspect.scoring.suspects import SUSPECTS_FILE, Suspect, describe, find_suspects, suspects_json

log = logging.getLogger(__name__)


def calibrate_copod_only(folder: Path, out: Path, false_reject_rate: float = 0.01,
                         exclude_suspects: bool = False) -> tuple[int, float]:
    """Fit COPOD on classical embeddings of the good images; returns (calibration n, threshold).
    exclude_suspects: fit again without the calibration images that look defective (suspects.py)."""
    from diffinspect.scoring.copod import SCORES_FILE, fit_copod, scores_npy

    files = normal_images(folder)
    prep = Preprocess(color=choose_color(files, "auto"))
    read = read_images(files, prep.color, "good images")
    frames, paths = read.frames, [str(p) for p in read.paths]
    copod = fit_copod(frames, prep, false_reject_rate)
    found = find_suspects(copod.calibration_scores, [paths[i] for i in copod.calibration_index])
    excluded: list[Suspect] = []
    if exclude_suspects and found:
        excluded, dropped = found, {s.image for s in found}
        frames, paths = zip(*[(f, p) for f, p in zip(frames, paths, strict=True) if p not in dropped], strict=True)
        copod = fit_copod(list(frames), prep, false_reject_rate)
        found = find_suspects(copod.calibration_scores, [paths[i] for i in copod.calibration_index])
    for line in describe(found, excluded):
        log.info(line)
    health = fit_health(frames, {copod.name: copod.calibration_scores}, prep.read_side(copod.feature_size))
    manifest = Manifest(preprocess=prep, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        training=Training(source=str(Path(folder).resolve())))
    with bundle_io.creating(out, command="calibrate --detector copod") as tmp:
        manifest.fallback = copod.save(tmp)
        (tmp / SCORES_FILE).write_bytes(scores_npy(copod.calibration_scores))
        (tmp / SUSPECTS_FILE).write_bytes(suspects_json(found, excluded))
        names = [manifest.fallback.file, SCORES_FILE, SUSPECTS_FILE]
        if health is not None:
            (tmp / HEALTH_FILE).write_bytes(health.to_bytes())
            manifest.health = health.record()
            names.append(HEALTH_FILE)
        bundle_io.finish(tmp, manifest, names)
    return copod.n_calibration, copod.threshold
