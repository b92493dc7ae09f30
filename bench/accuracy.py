"""Accuracy on labelled categories with the default recipe, the way a user runs it.

For each category: `inspect train CAT --out B --max-minutes M` (unless --reuse finds B), then
`inspect calibrate B` (held-out good images), then the evaluation library on the category's test set:
image AUROC, pixel AUROC and AUPRO for the diffusion detector, the COPOD fallback and the paper's
classical baselines (IForest, OCSVM, COPOD on 64 px pixels + PCA 50, and on the fallback embeddings).

Categories whose file names carry capture dates (ball_screw: `_YYMMDD...`) are also evaluated against
the good photos of the defects' days only (`--same-day REGEX`), since the day can separate the sets.
Categories whose good test photos have near-twins in training (magnetic_tile: the same tile in several
exposures) are also evaluated without those photos (`twin_free`), since a line never sees a part twice.

    python bench/accuracy.py ../shared/datasets/magnetic_tile ../shared/datasets/ball_screw \
        --workdir /tmp/acc --minutes 15

`--curve 1,3,5,15,60` instead trains each category once and evaluates snapshots after those CPU minutes,
beside the best classical baseline and DRAEM (time to accuracy: bench/curve.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from diffinspect.bundle import Bundle, is_bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.evaluation.evaluate import evaluate

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "miss_rate")


def run(*args: str) -> None:
    print("$ inspect", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "diffinspect", *args], check=True)


def good_view(category: Path, good: list[Path], name: str, folder: Path) -> Path:
    """An MVTec-layout view of the category (symlinks) whose test/good holds only `good`."""
    view = folder / f"{category.name}_{name}"
    (view / "test" / "good").mkdir(parents=True, exist_ok=True)
    for p in good:
        (view / "test" / "good" / p.name).symlink_to(p.resolve())
    for sub in (category / "test").iterdir():
        if sub.name != "good":
            (view / "test" / sub.name).symlink_to(sub.resolve())
    for part in ("ground_truth", "train"):
        if (category / part).exists():
            (view / part).symlink_to((category / part).resolve())
    return view


def calibrate(bundle: Path, extra: str) -> None:
    try:
        run("calibrate", str(bundle), *extra.split())
    except subprocess.CalledProcessError:
        # Too few held-out images for the default 1 % (99 needed): the AUROC figures do not depend on
        # the rate, so calibrate at the rate the holdout supports and say so.
        print(f"{bundle.name}: the holdout is too small for a 1 % rate; calibrating at 2.5 %", flush=True)
        run("calibrate", str(bundle), "--false-reject-rate", "0.025", *extra.split())


def same_day_view(category: Path, pattern: str, folder: Path) -> Path | None:
    good = [p for p in (category / "test" / "good").iterdir() if re.search(pattern, p.name)]
    return good_view(category, good, "same_day", folder) if good else None


def _thumbnails(paths: list[Path]) -> np.ndarray:
    """32 x 32 gray thumbnails, centred and unit-norm: their dot product is the pixel correlation."""
    rows = []
    for p in paths:
        g = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (32, 32), interpolation=cv2.INTER_AREA)
        v = g.astype(np.float64).ravel() - g.mean()
        rows.append(v / max(np.linalg.norm(v), 1e-9))
    return np.array(rows)


def twins(category: Path, bundle: Path, corr: float) -> np.ndarray | None:
    """Per test photo of the category (labelled_set order): True where a good photo has a near-twin among
    the bundle's training photos (32 px pixel correlation above corr: the same physical part photographed
    again, as magnetic_tile's exposure series are). A detector that remembers training photos scores
    such twins low, which a line never sees. None where the rule does not single out twins: when it also
    matches half of the defective photos (an aligned product, where every photo correlates), or no or
    every good photo."""
    train = _thumbnails(Bundle.load(bundle, verify=False).manifest.training.paths_on_disk())
    test = labelled_set(category).samples
    best = (_thumbnails([s.path for s in test]) @ train.T).max(1)
    good = np.array([not s.is_anomalous for s in test])
    twin = best > corr
    print(f"{category.name}: {twin[good].sum()} of {good.sum()} good and {twin[~good].sum()} of "
          f"{(~good).sum()} defective test photos have a twin in training (correlation > {corr:g})", flush=True)
    if twin[~good].mean() >= 0.5 or not twin[good].any() or twin[good].all():
        return None
    return twin & good


def twin_free_view(category: Path, bundle: Path, folder: Path, corr: float) -> Path | None:
    """The category without the good test photos that have a twin in training (see twins)."""
    twin = twins(category, bundle, corr)
    if twin is None:
        return None
    test = labelled_set(category).samples
    return good_view(category, [s.path for s, t in zip(test, twin, strict=True) if not s.is_anomalous and not t],
                     "twin_free", folder)


def table(report: dict) -> str:
    lines = [f"{'dataset':28s} {'method':18s} " + " ".join(f"{c:>12s}" for c in COLUMNS)]
    for ds, methods in report["datasets"].items():
        for method, figs in methods.items():
            cells = [f"{figs.get(c):12.3f}" if isinstance(figs.get(c), float) else f"{'-':>12s}" for c in COLUMNS]
            lines.append(f"{ds:28s} {method:18s} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("categories", nargs="+", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("accuracy_run"))
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train a fixed number of steps instead of --minutes (comparable on busy cores)")
    ap.add_argument("--train-args", default="", help="extra flags for inspect train, e.g. '--model dit'")
    ap.add_argument("--calibrate-args", default="", help="extra flags for inspect calibrate, e.g. '--fusion sum'")
    ap.add_argument("--tag", default="default", help="name of this recipe in the bundle folder names")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --workdir (no training)")
    ap.add_argument("--same-day", default=r"_2009(05|06|07)", help="regex for same-day good photos")
    ap.add_argument("--twins", type=float, default=0.95, help="pixel correlation that makes a twin photo")
    ap.add_argument("--baselines", default="iforest,ocsvm,copod")
    ap.add_argument("--curve", default=None, help="time to accuracy: snapshots after these CPU minutes of one "
                    "training (e.g. 1,3,5,15,60; bench/curve.py)")
    ap.add_argument("--draem-minutes", default=None,
                    help="with --curve: DRAEM's CPU minutes (default: the curve's; 'none' skips DRAEM)")
    ap.add_argument("--draem-size", type=int, default=256, help="with --curve: DRAEM's input side")
    ap.add_argument("--peer-venv", type=Path, default=None, help="DRAEM's venv (default: WORKDIR/peer-venv)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    if args.curve:
        import curve

        curve.main(args.categories, [float(m) for m in args.curve.split(",")], args)
        return
    views = Path(tempfile.mkdtemp(prefix="same_day_"))
    summary = {}
    for cat in args.categories:
        bundle = args.workdir / f"{cat.name}_{args.tag}"
        if not (args.reuse and is_bundle(bundle)):
            budget = ("--steps", str(args.steps)) if args.steps else ("--max-minutes", str(args.minutes))
            run("train", str(cat), "--out", str(bundle), *budget, "--overwrite", *args.train_args.split())
        calibrate(bundle, args.calibrate_args)
        datasets = [cat]
        for view in (same_day_view(cat, args.same_day, views), twin_free_view(cat, bundle, views, args.twins)):
            if view is not None:
                datasets.append(view)
        kinds = [k for k in args.baselines.split(",") if k]
        report = evaluate([bundle], datasets, args.workdir / f"report_{cat.name}_{args.tag}", kinds)
        print(table(report), flush=True)
        summary[cat.name] = report["datasets"]
    out = args.workdir / f"accuracy_{args.tag}.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
