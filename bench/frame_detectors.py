"""The frame term's detector on the classical embeddings: one Gaussian, or the nearest good parts.

For calibrated bundles and their labelled categories, the frame term is rebuilt with each detector on
the bundle's own fit embeddings and thresholds, exactly as `inspect calibrate --frame-detector X` would
(scoring/diffusion.py FrameTerm), and measured alone and fused with the bundle's diffusion score by the
best-rank rule: image AUROC, misses and false rejects at the threshold for --rate.

Where training holds near-twins of other photos (magnetic_tile's exposure series: the same physical part
photographed again; bench/accuracy.py's rule), a nearest-neighbour detector finds a held-out photo's twin
in memory and scores it low, which a line, where every part is new, never sees; that lowers the
threshold too. The `twins out` rows score every calibration and test photo without its twins in memory;
"fresh" AUROC leaves out the good test photos that have a twin in training. Read those rows. On an
aligned product (ball_screw) every photo correlates with the others, so the rule finds no twins.

    inspect calibrate B                              # any calibrated bundle (the default minp rule)
    python bench/frame_detectors.py B:../shared/datasets/magnetic_tile --rate 0.01
    python bench/frame_detectors.py B2:../shared/datasets/ball_screw --rate 0.025
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from accuracy import _thumbnails

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.evaluation.metrics import image_auroc
from diffinspect.scoring.calibrate import image_sets
from diffinspect.scoring.diffusion import embedding_scorer, robust_scale
from diffinspect.scoring.gaussian import NearestEmbedding
from diffinspect.scoring.loader import load_detector
from diffinspect.scoring.threshold import conformal_threshold, min_rank_threshold

TWIN_CORRELATION = 0.95  # bench/accuracy.py --twins


def measure(bundle_path: Path, category: Path, rate: float, neighbours: tuple[int, ...]) -> list[str]:
    bundle = Bundle.load(bundle_path)
    det = load_detector(bundle, backend="torch")
    term = det.frame_term
    assert term is not None and term.rule == "minp", "calibrate the bundle with the default (minp) frame term"
    det.frame_term = None  # the diffusion score alone; the frame term is rebuilt below
    _, cal_paths, _ = image_sets(bundle, None)
    samples = labelled_set(category).samples
    labels = np.array([s.is_anomalous for s in samples])
    paths = {"cal": cal_paths, "test": [s.path for s in samples]}
    frames = {k: [read_image(p, det.preprocess.color) for p in v] for k, v in paths.items()}
    diff = {k: np.concatenate([det.score(v[i:i + 32]).scores for i in range(0, len(v), 32)]) for k, v in frames.items()}
    emb = {k: term.copod.embed(v) for k, v in frames.items()}
    fit = term.copod.embeddings
    train = _thumbnails(bundle.manifest.training.paths_on_disk())
    twin = {k: _thumbnails(v) @ train.T > TWIN_CORRELATION for k, v in paths.items()}
    if twin["test"][labels].any(1).mean() >= 0.5:  # an aligned product: every photo correlates, no twins
        twin = {k: np.zeros_like(v) for k, v in twin.items()}
    fresh = labels | ~twin["test"].any(1)
    n = len(cal_paths)
    lines = [f"{category.name}: {n} calibration photos ({twin['cal'].any(1).mean():.0%} with a twin in training), "
             f"{(~labels).sum()} good test photos ({(~fresh).sum()} with a twin), {labels.sum()} defective, "
             f"rate {rate:g}"]

    def row(name: str, scorer, cal_s: np.ndarray, test_s: np.ndarray) -> None:
        alone = test_s > conformal_threshold(cal_s, rate)
        fused_term = replace(term, copod_scale=robust_scale(scorer(fit)), calibration=(diff["cal"], cal_s))
        fused = fused_term.fuse(diff["test"], test_s)
        reject = fused > min_rank_threshold(n, rate)
        lines.append(f"  {name:26s} alone: AUROC {image_auroc(labels, test_s):.3f} (fresh "
                     f"{image_auroc(labels[fresh], test_s[fresh]):.3f}), misses {np.mean(~alone[labels]):.0%} | "
                     f"fused: AUROC {image_auroc(labels, fused):.3f} "
                     f"(fresh {image_auroc(labels[fresh], fused[fresh]):.3f}), "
                     f"misses {np.mean(~reject[labels]):.0%}, false rejects {np.mean(reject[~labels]):.1%} "
                     f"(fresh goods {np.mean(reject[fresh & ~labels]):.1%})")

    gaussian = embedding_scorer(term.copod, "gaussian")
    row("gaussian", gaussian, gaussian(emb["cal"]), gaussian(emb["test"]))
    for k in neighbours:
        near = NearestEmbedding(fit, k)
        row(f"knn k={k}", near.score, near.score(emb["cal"]), near.score(emb["test"]))
        if twin["cal"].any():
            row(f"knn k={k}, twins out", near.score, near.score(emb["cal"], twin["cal"]),
                near.score(emb["test"], twin["test"]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="BUNDLE:CATEGORY")
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--neighbours", default=f"1,{NearestEmbedding.NEIGHBOURS}")
    args = ap.parse_args()
    ks = tuple(int(k) for k in args.neighbours.split(","))
    for pair in args.pairs:
        bundle, category = pair.split(":", 1)
        print("\n".join(measure(Path(bundle), Path(category), args.rate, ks)), flush=True)


if __name__ == "__main__":
    main()
