"""A COPOD-only bundle from good images alone: a line can be inspected before any model is trained."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from diffinspect import bundle as bundle_io
from diffinspect.data.datasets import normal_images
from diffinspect.data.image import Preprocess, choose_color
from diffinspect.data.reading import read_images
from diffinspect.scoring.health import HEALTH_FILE, fit_health


def calibrate_copod_only(folder: Path, out: Path, false_reject_rate: float = 0.01) -> tuple[int, float]:
    """Fit COPOD on classical embeddings of the good images; returns (calibration n, threshold)."""
    from diffinspect.scoring.copod import SCORES_FILE, fit_copod, scores_npy

    files = normal_images(folder)
    prep = Preprocess(color=choose_color(files, "auto"))
    frames = read_images(files, prep.color, "good images").frames
    copod = fit_copod(frames, prep, false_reject_rate)
    health = fit_health(frames, {copod.name: copod.calibration_scores})
    manifest = bundle_io.new_manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        preprocess=prep.to_dict(), calibration=None, exports={}, training={"source": str(Path(folder).resolve())})
    with bundle_io.creating(out) as tmp:
        fields = copod.save(tmp / "copod")
        shutil.move(tmp / "copod" / fields["embeddings_file"], tmp / fields["embeddings_file"])
        (tmp / "copod").rmdir()
        fields["file"] = fields["embeddings_file"]
        manifest["fallback"] = fields
        (tmp / SCORES_FILE).write_bytes(scores_npy(copod.calibration_scores))
        names = [fields["embeddings_file"], SCORES_FILE]
        if health is not None:
            (tmp / HEALTH_FILE).write_bytes(health.to_bytes())
            manifest["health"] = health.manifest()
            names.append(HEALTH_FILE)
        bundle_io.finish(tmp, manifest, names)
    return copod.n_calibration, copod.threshold
