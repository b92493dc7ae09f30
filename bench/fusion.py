"""Fusing the diffusion score with the frame term's embedding score: which rule, at what false-reject rate.

For calibrated bundles (`inspect calibrate` fitted the frame term: a Gaussian, or COPOD, on the
classical embeddings) and their labelled categories, scores the calibration images (the bundle's
holdout) and the test images with the diffusion detector alone and with the embedding detector alone,
then compares fusion rules on image AUROC and on misses / false rejects at each rule's own threshold
for --rate:

- diffusion, embedding: each alone, split-conformal threshold on the calibration scores (FRR <= a).
- sum: robust z-scores (reference-image median / IQR) added; one conformal
  threshold on the sum (FRR <= a).
- max: the larger of the two robust z-scores; one conformal threshold (FRR <= a).
- minp: the full-conformal p-value of each part's better rank among the calibration parts, equal
  ranks ordered by the sum (`score.fusion = "minp"`, threshold.min_rank_p): FRR <= a from n >= 1 / a - 1
  calibration images.

    python bench/fusion.py /tmp/acc/ball_screw_geom:../shared/datasets/ball_screw --rate 0.01
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.evaluation.metrics import image_auroc
from diffinspect.scoring.calibrate import image_sets
from diffinspect.scoring.diffusion import FrameTerm, robust_z
from diffinspect.scoring.loader import load_detector
from diffinspect.scoring.threshold import conformal_threshold, min_calibration_size, min_rank_threshold


def scores(bundle: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(diffusion score without the frame term, the frame term's embedding score) per image; the
    embedding score is the bundle's frame detector (gaussian or copod), or COPOD without a term."""
    det = load_detector(bundle, backend="torch")
    term = det.frame_term
    det.frame_term = None
    copod = None if term else load_detector(bundle, "copod")
    d, c = [], []
    for i in range(0, len(paths), 32):
        frames = [read_image(p, det.preprocess.color) for p in paths[i:i + 32]]
        d.append(det.score(frames).scores)
        c.append(term.embedding_scores(frames) if term else copod.score(frames).scores)
    return np.concatenate(d), np.concatenate(c)


def evaluate(cal: dict[str, np.ndarray], test: dict[str, np.ndarray], labels: np.ndarray, rate: float,
             scale: dict) -> dict[str, dict]:
    out = {}

    def row(name: str, cal_s: np.ndarray | None, test_s: np.ndarray, reject: np.ndarray | None = None) -> None:
        if reject is None and cal_s is not None and len(cal_s) >= min_calibration_size(rate):
            reject = test_s > conformal_threshold(cal_s, rate)
        out[name] = {"image_auroc": image_auroc(labels, test_s),
                     "miss_rate": float(np.mean(~reject[labels])) if reject is not None else None,
                     "false_reject_rate": float(np.mean(reject[~labels])) if reject is not None else None}

    row("diffusion", cal["d"], test["d"])
    row("embedding", cal["c"], test["c"])
    if scale:
        zc = {k: (robust_z(v["d"], scale["diffusion"]), robust_z(v["c"], scale["copod"])) for k, v in
              (("cal", cal), ("test", test))}
        row("sum", zc["cal"][0] + scale["weight"] * zc["cal"][1], zc["test"][0] + scale["weight"] * zc["test"][1])
        row("max", np.maximum(*zc["cal"]), np.maximum(*zc["test"]))
        term = FrameTerm(None, scale["weight"], scale["diffusion"], scale["copod"], "minp", (cal["d"], cal["c"]))
        n = len(cal["d"])
        reject = None
        fused = term.fuse(test["d"], test["c"])
        if n >= min_calibration_size(rate):
            reject = fused > min_rank_threshold(n, rate)
        row("minp", None, fused, reject)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="BUNDLE:CATEGORY")
    ap.add_argument("--rate", type=float, default=0.01)
    ap.add_argument("--same-day", default=r"_2009(05|06|07)", help="regex for same-day good photos")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    report = {}
    for pair in args.pairs:
        bundle, category = (Path(x) for x in pair.split(":"))
        b = Bundle.load(bundle)
        _, cal_paths, _ = image_sets(b, None)
        test = labelled_set(category)
        paths = [s.path for s in test.samples]
        labels = np.array([s.defect != "good" for s in test.samples])
        cd, cc = scores(bundle, cal_paths)
        td, tc = scores(bundle, paths)
        term = b.manifest.calibration and b.manifest.calibration.frame_term
        scale = {"diffusion": term.diffusion, "copod": term.copod, "weight": term.weight} if term else {}
        rate = args.rate if len(cd) >= min_calibration_size(args.rate) else 0.025
        views = {"all": np.ones(len(paths), bool)}
        same = np.array([bool(re.search(args.same_day, p.name)) or s.defect != "good"
                         for p, s in zip(paths, test.samples, strict=True)])
        if (~labels & same).any() and not same.all():
            views["same_day"] = same
        for view, keep in views.items():
            res = evaluate({"d": cd, "c": cc}, {"d": td[keep], "c": tc[keep]}, labels[keep], rate, scale)
            key = f"{bundle.name} {view} (n_cal {len(cd)}, rate {rate:g})"
            report[key] = res
            print(key)
            for name, r in res.items():
                cells = " ".join(f"{k} {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"{k} -"
                                 for k, v in r.items())
                print(f"  {name:10s} {cells}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
