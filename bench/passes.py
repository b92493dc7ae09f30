"""Would a second pass help? Fuses the scores of several calibrated bundles on one category.

Each bundle (say a whole-frame bundle and a tiles bundle, `[data] feed = "tiles"`, trained on the same
images) scores the first bundle's calibration images and the category's test images with its diffusion
detector alone; the first bundle's embedding detector (its frame term) joins as one more pass. Prints
image AUROC over all defects and per defect type for each pass, and for the sum of their robust
z-scores (median / IQR on the calibration images) and the best-rank rule (threshold.min_rank_p) of
every combination.

    python bench/passes.py ../shared/datasets/magnetic_tile /tmp/acc/mt_frame /tmp/acc/mt_tiles
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from fusion import scores

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.evaluation.metrics import image_auroc
from diffinspect.scoring.calibrate import image_sets
from diffinspect.scoring.diffusion import robust_scale, robust_z
from diffinspect.scoring.threshold import min_rank_p


def report(name: str, labels: np.ndarray, defects: np.ndarray, s: np.ndarray) -> None:
    kinds = sorted(set(defects[labels]))
    per = " ".join(f"{d} {image_auroc(labels[(defects == d) | ~labels], s[(defects == d) | ~labels]):.3f}"
                   for d in kinds)
    print(f"{name:50s} {image_auroc(labels, s):.3f}   {per}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("category", type=Path)
    ap.add_argument("bundles", nargs="+", type=Path)
    args = ap.parse_args()
    test = labelled_set(args.category)
    paths = [s.path for s in test.samples]
    labels = np.array([s.is_anomalous for s in test.samples])
    defects = np.array([s.defect for s in test.samples])
    _, cal_paths, _ = image_sets(Bundle.load(args.bundles[0]), None)
    cal, new = {}, {}
    for bundle in args.bundles:
        (cal[bundle.name], cal_copod), (new[bundle.name], new_copod) = (
            scores(bundle, cal_paths), scores(bundle, paths))
        if "embedding" not in cal:
            cal["embedding"], new["embedding"] = cal_copod, new_copod
    print(f"{'pass':50s} image AUROC, then per defect type")
    for name in cal:
        report(name, labels, defects, new[name])
    z = {name: robust_z(new[name], robust_scale(cal[name])) for name in cal}
    zcal = {name: robust_z(cal[name], robust_scale(cal[name])) for name in cal}
    for r in range(2, len(cal) + 1):
        for combo in itertools.combinations(cal, r):
            summed = sum(z[n] for n in combo)
            report("sum " + " + ".join(combo), labels, defects, summed)
            p = min_rank_p(np.stack([cal[n] for n in combo]), np.stack([new[n] for n in combo]),
                           sum(zcal[n] for n in combo), summed)
            report("best rank " + " + ".join(combo), labels, defects, -np.log(p) + 1e-6 * np.arctan(summed))


if __name__ == "__main__":
    main()
