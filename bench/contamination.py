"""Contaminated calibration sets: what a few defective images among the "good" images given to a
cold-start COPOD calibration (`inspect calibrate --detector copod`) do to the line, with and without
`--exclude-suspects`.

Per dataset: the good images given to calibration are CATEGORY/train/good plus k defective test images,
k chosen so that they are 0 %, 1 % or 3 % of the images given; the other defective images (never given)
and CATEGORY/test/good measure the miss rate and the false-reject rate (FRR) at the calibrated threshold.
Each image is embedded once; calibration is fit_copod's split (half fits COPOD, half calibrates) over the
cached embeddings, and suspects are found as `inspect calibrate` finds them (scoring/suspects.py).
REPEATS seeded draws (which defective images go in, and the fit/calibration split) are averaged.

    OMP_NUM_THREADS=1 python bench/contamination.py /work/shared/datasets/magnetic_tile \\
        /work/shared/datasets/ball_screw [--alpha 0.01] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from diffinspect.data.datasets import list_images
from diffinspect.data.image import Preprocess, choose_color
from diffinspect.data.reading import read_images
from diffinspect.scoring.copod import fit_copod_embeddings
from diffinspect.scoring.features import classical_embedding
from diffinspect.scoring.gaussian import GaussianEmbedding
from diffinspect.scoring.suspects import RULE, find_suspects

RATES = (0.0, 0.01, 0.03)


def embed(paths: list[Path], prep: Preprocess) -> np.ndarray:
    read = read_images(paths, prep.color, "images", transform=lambda f: classical_embedding(prep.crop_roi(f)))
    assert len(read.frames) == len(paths), "an unreadable image in the dataset"
    return np.stack(read.frames)


def run(root: Path, alpha: float, repeats: int) -> list[dict]:
    good_train = list_images(root / "train" / "good")
    good_test = list_images(root / "test" / "good")
    defects = sorted(p for d in (root / "test").iterdir() if d.is_dir() and d.name != "good" for p in list_images(d))
    prep = Preprocess(color=choose_color(good_train, "auto"))
    t0 = time.monotonic()
    e_train, e_good, e_defect = embed(good_train, prep), embed(good_test, prep), embed(defects, prep)
    print(f"{root.name}: {len(good_train)} train good, {len(good_test)} test good, {len(defects)} defective; "
          f"embedded in {time.monotonic() - t0:.0f} s")
    rows = []
    for rate in RATES:
        k = round(rate / (1 - rate) * len(good_train))
        acc: dict[str, list[float]] = {}
        for seed in range(repeats):
            rng = np.random.default_rng(seed)
            chosen = rng.permutation(len(defects))
            given, held = chosen[:k], chosen[k:]
            emb = np.concatenate([e_train, e_defect[given]])
            is_defect = np.r_[np.zeros(len(e_train), bool), np.ones(k, bool)]
            det = fit_copod_embeddings(emb, prep, alpha, seed=seed)
            names = [str(i) for i in det.calibration_index]
            flagged = {int(s.image) for s in find_suspects(det.calibration_scores, names)}
            # The same rule on another score: the Gaussian frame term's, fitted on COPOD's fit half.
            fit = np.setdiff1d(np.arange(len(emb)), det.calibration_index)
            gauss = GaussianEmbedding(emb[fit]).score(emb[det.calibration_index])
            by_gauss = {int(s.image) for s in find_suspects(gauss, names)}
            acc.setdefault("gauss_defective", []).append(sum(is_defect[i] for i in by_gauss))
            acc.setdefault("gauss_good", []).append(sum(not is_defect[i] for i in by_gauss))
            cal_defects = int(is_defect[det.calibration_index].sum())
            for mode in ("kept", "excluded"):
                d = det
                if mode == "excluded" and flagged:
                    keep = np.setdiff1d(np.arange(len(emb)), list(flagged))
                    d = fit_copod_embeddings(emb[keep], prep, alpha, seed=seed)
                frr = float(np.mean(d.score_embeddings(e_good) > d.threshold))
                miss = float(np.mean(d.score_embeddings(e_defect[held]) <= d.threshold))
                for key, v in ((f"{mode}_frr", frr), (f"{mode}_miss", miss)):
                    acc.setdefault(key, []).append(v)
            acc.setdefault("given", []).append(k)
            acc.setdefault("in_calibration", []).append(cal_defects)
            acc.setdefault("flagged_defective", []).append(sum(is_defect[i] for i in flagged))
            acc.setdefault("flagged_good", []).append(sum(not is_defect[i] for i in flagged))
        rows.append({"dataset": root.name, "rate": rate, **{key: float(np.mean(v)) for key, v in acc.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+", type=Path)
    ap.add_argument("--alpha", type=float, default=0.01, help="target false-reject rate")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = [r for root in args.datasets for r in run(root, args.alpha, args.repeats)]
    print(f"\nCOPOD cold start, target false-reject rate {args.alpha:g}, mean of {args.repeats} draws; "
          f"suspects: {RULE}")
    print("| dataset | defective given | of them in calibration | FRR | miss | flagged (defective / good) "
          "| FRR excluded | miss excluded | flagged on the Gaussian's score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['rate']:.0%} ({r['given']:.0f}) | {r['in_calibration']:.1f} | "
              f"{r['kept_frr']:.3f} | {r['kept_miss']:.3f} | {r['flagged_defective']:.1f} / {r['flagged_good']:.1f} | "
              f"{r['excluded_frr']:.3f} | {r['excluded_miss']:.3f} | "
              f"{r['gauss_defective']:.1f} / {r['gauss_good']:.1f} |")


if __name__ == "__main__":
    main()
