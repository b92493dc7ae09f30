"""Choosing a distilled student by what it is for: finding defects.

A student that copies its input matches the teacher closely on good images and finds nothing, so the
teacher-match error alone cannot pick a checkpoint. Each candidate is measured as it will be used: a
ScoringGraph with the student, per-pixel statistics from a few training images, and image AUROC of
held-out good images against synthetic defects pasted onto the same images (`anomaly_set`). The
teacher-match error is reported next to it, on the good images at the fixed scoring noise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffinspect.data.anomalies import MIN_SIDE, anomaly_set
from diffinspect.data.image import ImageSize, Preprocess
from diffinspect.data.reading import read_images
from diffinspect.evaluation.metrics import image_auroc
from diffinspect.models.scoring import ScoringGraph
from diffinspect.scoring.diffusion import Stats

STATS_IMAGES = 16  # training images behind the per-pixel statistics
MAX_GOOD = 48  # held-out good images; each also gets SYNTHETIC_PER_IMAGE defective copies
SYNTHETIC_PER_IMAGE = 2
BATCH = 32


def read_frames(paths: list[Path], prep: Preprocess, size: ImageSize | None = None) -> list[np.ndarray]:
    """Decoded, ROI-cropped frames fitted to `size` (default: the model size); unreadable files skipped."""
    return read_images(paths, prep.color, "selection images", transform=lambda f: prep.fit(f, size)).frames


@dataclass
class SelectionSet:
    reference: np.ndarray  # (R, H, W, C) uint8: training images for the statistics
    frames: np.ndarray  # (M, H, W, C) uint8: the good images first, then their synthetic defects
    labels: np.ndarray  # (M,) bool, True for a synthetic defect
    source: str  # where the good images came from, for the log and the manifest

    @property
    def good(self) -> np.ndarray:
        return self.frames[~self.labels]

    def describe(self) -> dict:
        return {"good": int((~self.labels).sum()), "synthetic": int(self.labels.sum()),
                "reference": len(self.reference), "source": self.source}


def selection_set(train_paths: list[Path], prep: Preprocess, seed: int = 0) -> SelectionSet:
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(train_paths))[:STATS_IMAGES])
    reference = read_frames([train_paths[i] for i in pick], prep)
    # Training images the statistics do not use, never the holdout: the holdout is what calibration
    # scores, and choosing a checkpoint on it would weaken the conformal bound.
    used = set(pick)
    rest = [p for i, p in enumerate(train_paths) if i not in used][:MAX_GOOD]
    rest = rest if len(rest) >= 4 else train_paths[:MAX_GOOD]
    good_paths, source = rest, f"{len(rest)} training images not used for statistics"
    size, (h, w) = prep.image_size, prep.hw
    # Defects are pasted at model size (the short side at least anomalies.MIN_SIDE), so their size
    # relative to the part is what anomaly_set intends.
    k = max(1.0, MIN_SIDE / min(h, w))
    paste_size = (round(h * k), round(w * k))
    base = read_frames(good_paths, prep, paste_size)
    bad, _ = anomaly_set(base, rng, per_image=SYNTHETIC_PER_IMAGE)
    plain = replace(prep, roi=None, resize="stretch")
    good = [plain.fit(f, size) for f in base]
    bad = [plain.fit(f, size) for f in bad]
    frames = np.stack(good + bad)
    labels = np.array([False] * len(good) + [True] * len(bad))
    return SelectionSet(np.stack(reference), frames, labels, source)


def _batches(frames: np.ndarray, device: torch.device):
    for i in range(0, len(frames), BATCH):
        yield torch.from_numpy(np.ascontiguousarray(frames[i:i + BATCH])).to(device)


@torch.no_grad()
def reconstructions(graph: ScoringGraph, frames: np.ndarray) -> torch.Tensor:
    """x̂0 of each frame from the first fixed scoring noise draw, on the graph's device."""
    noise, device = graph.noise[:1], graph.noise.device
    out = []
    for f in _batches(frames, device):
        x = graph.to_input(f)
        out.append(graph.reconstruct(x, noise.expand_as(x)))
    return torch.cat(out)


@torch.no_grad()
def measure(graph: ScoringGraph, sel: SelectionSet) -> float:
    """Image AUROC of the graph's score on the selection set (statistics from sel.reference)."""
    device = graph.noise.device
    raw = np.concatenate([graph.raw_terms(f).cpu().numpy() for f in _batches(sel.reference, device)])
    stats = Stats.fit(raw)
    mean, std = torch.from_numpy(stats.mean).to(device), torch.from_numpy(stats.std).to(device)
    scores = np.concatenate([graph(f, mean, std)[1].cpu().numpy() for f in _batches(sel.frames, device)])
    auroc = image_auroc(sel.labels, scores)
    return float("nan") if auroc is None else auroc
