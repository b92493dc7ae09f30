"""The frame term: which detector on which classical embeddings (issue 21's misses at the line's rate).

For calibrated bundles and their labelled categories, the frame term is rebuilt for each arm on the
bundle's training photos and fused with the bundle's own diffusion score by the product's best-rank rule
(scoring/diffusion.py FrameTerm), as `inspect calibrate` would. Arms: one Gaussian or the nearest good
parts (k neighbours), on the embeddings of the feature size alone (feature recipe v1) or of the feature
size, its half and its quarter (v2, the default). Columns: image AUROC of the detector alone and fused,
misses and false rejects at the threshold for --rate on the bundle's calibration photos, and the mean
(and spread) of misses over --draws random calibration sets of the same size drawn from the calibration
and good test photos together (the others are the good test photos): one draw's misses hang on its top
calibration scores.

Where training holds near-twins of other photos (magnetic_tile's exposure series: the same physical part
photographed again; bench/accuracy.py's rule), a nearest-neighbour detector finds a held-out photo's twin
in memory and scores it low, which a line, where every part is new, never sees. So the nearest-neighbour
arms score every calibration and test photo without its twins in memory, and "fresh" AUROC leaves out
the good test photos with a twin in training. On an aligned product (ball_screw) every photo correlates
with the others, so the rule finds no twins.

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
from diffinspect.scoring.diffusion import robust_scale
from diffinspect.scoring.features import SCALE_DIM, embed_frames
from diffinspect.scoring.gaussian import GaussianEmbedding, NearestEmbedding
from diffinspect.scoring.loader import load_detector
from diffinspect.scoring.threshold import min_rank_threshold

TWIN_CORRELATION = 0.95  # bench/accuracy.py --twins


def measure(bundle_path: Path, category: Path, rate: float, neighbours: tuple[int, ...], draws: int) -> list[str]:
    bundle = Bundle.load(bundle_path)
    det = load_detector(bundle, backend="torch")
    term = det.frame_term
    assert term is not None and term.rule == "minp", "calibrate the bundle with the default (minp) frame term"
    det.frame_term = None  # the diffusion score alone; the frame term is rebuilt below
    prep = det.preprocess
    _, cal_paths, _ = image_sets(bundle, None)
    samples = labelled_set(category).samples
    labels = np.array([s.is_anomalous for s in samples])
    paths = {"fit": bundle.manifest.training.paths_on_disk(), "cal": cal_paths, "test": [s.path for s in samples]}
    frames = {k: [read_image(p, prep.color) for p in v] for k, v in paths.items()}
    diff = {k: np.concatenate([det.score(v[i:i + 32]).scores for i in range(0, len(v), 32)])
            for k, v in frames.items() if k != "fit"}
    emb2 = {k: embed_frames([prep.crop_roi(f) for f in v], term.copod.feature_size) for k, v in frames.items()}
    train = _thumbnails(paths["fit"])
    twin = {k: _thumbnails(paths[k]) @ train.T > TWIN_CORRELATION for k in ("cal", "test")}
    if twin["test"][labels].any(1).mean() >= 0.5:  # an aligned product: every photo correlates, no twins
        twin = {k: np.zeros_like(v) for k, v in twin.items()}
    fresh = labels | ~twin["test"].any(1)
    n = len(cal_paths)
    threshold = min_rank_threshold(n, rate)
    lines = [f"{category.name}: {len(paths['fit'])} training photos, {n} calibration photos "
             f"({twin['cal'].any(1).mean():.0%} with a twin in training), {(~labels).sum()} good test photos "
             f"({(~fresh).sum()} with a twin), {labels.sum()} defective, rate {rate:g}, {draws} draws"]

    def row(name: str, fit_scores: np.ndarray, cal_s: np.ndarray, test_s: np.ndarray) -> None:
        arm = replace(term, copod_scale=robust_scale(fit_scores), calibration=(diff["cal"], cal_s))
        fused = arm.fuse(diff["test"], test_s)
        reject = fused > threshold
        # Calibration sets drawn from every good photo scored (calibration and good test photos).
        pool_d, pool_e = np.r_[diff["cal"], diff["test"][~labels]], np.r_[cal_s, test_s[~labels]]
        rng, misses, rejects = np.random.default_rng(0), [], []
        for _ in range(draws):
            order = rng.permutation(len(pool_d))
            c, g = order[:n], order[n:]
            new = arm.fuse(np.r_[pool_d[g], diff["test"][labels]], np.r_[pool_e[g], test_s[labels]],
                           np.stack([pool_d[c], pool_e[c]])) > threshold
            misses.append(np.mean(~new[len(g):]))
            rejects.append(np.mean(new[:len(g)]))
        lines.append(f"  {name:28s} alone {image_auroc(labels, test_s):.3f} (fresh "
                     f"{image_auroc(labels[fresh], test_s[fresh]):.3f}) | fused {image_auroc(labels, fused):.3f} "
                     f"(fresh {image_auroc(labels[fresh], fused[fresh]):.3f}), misses {np.mean(~reject[labels]):.0%}, "
                     f"false rejects {np.mean(reject[~labels]):.1%} | {draws} draws: misses "
                     f"{np.mean(misses):.0%} +- {np.std(misses):.0%}, false rejects {np.mean(rejects):.1%}")

    for version, emb in (("v1", {k: v[:, :SCALE_DIM] for k, v in emb2.items()}), ("v2", emb2)):
        gauss = GaussianEmbedding(emb["fit"])
        row(f"{version} gaussian", gauss.score(emb["fit"]), gauss.score(emb["cal"]), gauss.score(emb["test"]))
        for k in neighbours:
            near = NearestEmbedding(emb["fit"], k)
            row(f"{version} knn k={k}", near.score(emb["fit"]), near.score(emb["cal"], twin["cal"]),
                near.score(emb["test"], twin["test"]))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="BUNDLE:CATEGORY")
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--neighbours", default=f"1,{NearestEmbedding.NEIGHBOURS}")
    ap.add_argument("--draws", type=int, default=100, help="random calibration sets for the mean misses")
    args = ap.parse_args()
    ks = tuple(int(k) for k in args.neighbours.split(","))
    for pair in args.pairs:
        bundle, category = pair.split(":", 1)
        print("\n".join(measure(Path(bundle), Path(category), args.rate, ks, args.draws)), flush=True)


if __name__ == "__main__":
    main()
