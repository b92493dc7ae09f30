"""Training images: decode, choose the colour mode, keep back a holdout, fit to the model size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.data.datasets import is_mvtec_category, normal_images
from diffinspect.data.image import Preprocess
from diffinspect.data.reading import read_images

MIN_IMAGES = 10


@dataclass
class TrainingSet:
    root: Path
    preprocess: Preprocess
    train_files: list[Path]
    holdout_files: list[Path]
    # The training share only: (N, S, S, C) uint8 frames, or in tiles mode a list of (H, W, C) uint8
    # canvases (sizes vary) that training crops its tiles from.
    images: np.ndarray | list[np.ndarray]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def relative(self, paths: list[Path]) -> list[str]:
        return [str(p.relative_to(self.source)) for p in paths]

    @property
    def source(self) -> Path:
        return self.root / "train" / "good" if is_mvtec_category(self.root) else self.root


def load_training_set(data: str | Path, preprocess: Preprocess, holdout: float, seed: int) -> TrainingSet:
    root = Path(data)
    files = normal_images(root)
    order = np.random.default_rng(seed).permutation(len(files))
    n_hold = int(round(len(files) * holdout))
    holdout_files = sorted(files[i] for i in order[:n_hold])
    train_files = sorted(files[i] for i in order[n_hold:])
    fit = preprocess.canvas if preprocess.feed == "tiles" else preprocess.fit
    read = read_images(train_files, preprocess.color, "training images", transform=fit)
    images, kept = read.frames, read.paths
    if len(kept) < MIN_IMAGES:
        raise DiffinspectError(
            f"only {len(kept)} decodable training images under {root} (of {len(train_files)} after a "
            f"{holdout:.0%} holdout); at least {MIN_IMAGES} are needed")
    stacked = images if preprocess.feed == "tiles" else np.stack(images)
    return TrainingSet(root, preprocess, kept, holdout_files, stacked, read.skipped)
