"""`inspect calibrate --tune`: choose t* and the map recipe on synthetic defects, never on real ones.

Training images are split: one part gives the normalization statistics, the other gets synthetic
defects pasted on (Perlin blends, cut-paste, scratches, spots, cracks, chips, bands). Each candidate
recipe is scored by image AUROC of pasted vs clean copies. The held-out images that calibration uses
are not touched, so tuning does not weaken the conformal bound.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Training
from diffinspect.data.anomalies import paste_anomaly
from diffinspect.data.reading import read_images
from diffinspect.models.from_bundle import load_denoiser
from diffinspect.models.recipe import TERMS
from diffinspect.models.scoring import ScoringGraph
from diffinspect.scoring.diffusion import Stats, fit_frames

log = logging.getLogger(__name__)

T_STARS = (50, 100, 200)
WEIGHTS = {"pixel": (1, 0, 0), "ssim": (0, 1, 0), "feature": (0, 0, 1), "pixel+ssim": (1, 1, 0),
           "all": (1, 1, 1)}
TOP_K = (0.01, 0.001)
MAX_IMAGES = 96


def synthetic_validation(frames: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clean copies and one pasted defect per image: (frames, labels)."""
    rng = np.random.default_rng(seed)
    bad = [paste_anomaly(f, rng, source=frames[(i + 1) % len(frames)])[0] for i, f in enumerate(frames)]
    return np.concatenate([frames, np.stack(bad)]), np.r_[np.zeros(len(frames)), np.ones(len(frames))]


@torch.no_grad()
def _raw(graph: ScoringGraph, frames: np.ndarray, batch: int = 32) -> torch.Tensor:
    return torch.cat([graph.raw_terms(torch.from_numpy(frames[i:i + batch])) for i in range(0, len(frames), batch)])


def tune(bundle_path: str | Path, seed: int = 0, **_: object) -> dict:
    """Pick the best recipe, write it into the manifest's `score`, return {recipe, auroc, table}."""
    bundle = Bundle.load(bundle_path)
    if bundle.manifest.student is not None:
        raise DiffinspectError("this bundle has a distilled student, trained for its current t*: tune before "
                               "distilling (or retrain), so the student matches the tuned recipe")
    prep = bundle.manifest.preprocess
    files = (bundle.manifest.training or Training()).paths_on_disk()
    if len(files) < 16:
        raise DiffinspectError("--tune needs the training images on disk (at least 16 found: "
                               f"{len(files)}); calibrate without --tune")
    rng = np.random.default_rng(seed)
    files = [files[i] for i in rng.permutation(len(files))[: 2 * MAX_IMAGES]]
    half = len(files) // 2
    ref = fit_frames(read_images(files[:half], prep.color, "training images").frames, prep)
    good = read_images(files[half:], prep.color, "training images").frames
    val, labels = synthetic_validation(fit_frames(good, prep), seed)
    model = load_denoiser(bundle)
    schedule = bundle.schedule
    base = bundle.recipe
    everything = replace(base, pixel_weight=1.0, ssim_weight=1.0, feature_weight=1.0)
    table = []
    for t_star in T_STARS:
        graph = ScoringGraph(model, schedule, replace(everything, t_star=t_star))
        raw_ref, raw_val = _raw(graph, ref), _raw(graph, val)
        for (name, w), top_k in itertools.product(WEIGHTS.items(), TOP_K):
            recipe = replace(base, t_star=t_star, top_k=top_k,
                             **{f"{term}_weight": float(v) for term, v in zip(TERMS, w, strict=True)})
            keep = [i for i, v in enumerate(w) if v]
            cand = ScoringGraph(model, schedule, recipe)
            stats = Stats.fit(raw_ref[:, keep].numpy())
            zmap = cand.combine(raw_val[:, keep], torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
            auroc = float(roc_auc_score(labels, cand.image_score(zmap).numpy()))
            table.append({"t_star": t_star, "terms": name, "top_k": top_k, "auroc": round(auroc, 4),
                          "recipe": recipe})
    best = max(table, key=lambda r: r["auroc"])
    log.info(f"tuned on {len(val)} synthetic validation images: t*={best['t_star']}, terms {best['terms']}, "
             f"top-k {best['top_k']} (AUROC {best['auroc']:.3f} on pasted defects)")
    with bundle.updating("tune") as up:
        up.manifest.score = best["recipe"]
        up.manifest.tuning = {"auroc": best["auroc"], "validation": "synthetic defects on training images",
                              "table": [{k: v for k, v in r.items() if k != "recipe"} for r in table]}
        up.manifest.calibration = None  # the recipe changed: the old statistics no longer apply
    return best
