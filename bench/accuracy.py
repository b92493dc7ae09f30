"""Accuracy on labelled categories with the default recipe, the way a user runs it.

For each category: `inspect train CAT --out B --max-minutes M` (unless --reuse finds B), then
`inspect calibrate B` (held-out good images), then the evaluation library on the category's test set:
image AUROC, pixel AUROC and AUPRO for the diffusion detector, the COPOD fallback and the paper's
classical baselines (IForest, OCSVM, COPOD on 64 px pixels + PCA 50, and on the fallback embeddings).

Categories whose file names carry capture dates (ball_screw: `_YYMMDD...`) are also evaluated against
the good photos of the defects' days only (`--same-day REGEX`), since the day can separate the sets.

    python bench/accuracy.py ../shared/datasets/magnetic_tile ../shared/datasets/ball_screw \
        --workdir /tmp/acc --minutes 15
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

from diffinspect.evaluation.evaluate import evaluate

COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "false_reject_rate", "miss_rate")


def run(*args: str) -> None:
    print("$ inspect", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "diffinspect", *args], check=True)


def same_day_view(category: Path, pattern: str, folder: Path) -> Path | None:
    """An MVTec-layout view of the category whose test/good holds only files matching pattern."""
    good = [p for p in (category / "test" / "good").iterdir() if re.search(pattern, p.name)]
    if not good:
        return None
    view = folder / f"{category.name}_same_day"
    (view / "test" / "good").mkdir(parents=True, exist_ok=True)
    for p in good:
        (view / "test" / "good" / p.name).symlink_to(p.resolve())
    for sub in (category / "test").iterdir():
        if sub.name != "good":
            (view / "test" / sub.name).symlink_to(sub.resolve())
    for name in ("ground_truth", "train"):
        if (category / name).exists():
            (view / name).symlink_to((category / name).resolve())
    return view


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
    ap.add_argument("--baselines", default="iforest,ocsvm,copod")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    views = Path(tempfile.mkdtemp(prefix="same_day_"))
    summary = {}
    for cat in args.categories:
        bundle = args.workdir / f"{cat.name}_{args.tag}"
        if not (args.reuse and (bundle / "manifest.json").exists()):
            budget = ("--steps", str(args.steps)) if args.steps else ("--max-minutes", str(args.minutes))
            run("train", str(cat), "--out", str(bundle), *budget, "--overwrite", *args.train_args.split())
        try:
            run("calibrate", str(bundle), *args.calibrate_args.split())
        except subprocess.CalledProcessError:
            # Too few held-out images for the default 1 % (99 needed): the AUROC figures do not depend on
            # the rate, so calibrate at the rate the holdout supports and say so.
            print(f"{cat.name}: the holdout is too small for a 1 % rate; calibrating at 2.5 %", flush=True)
            run("calibrate", str(bundle), "--false-reject-rate", "0.025", *args.calibrate_args.split())
        datasets = [cat]
        view = same_day_view(cat, args.same_day, views)
        if view is not None:
            datasets.append(view)
        kinds = [k for k in args.baselines.split(",") if k]
        report = evaluate([bundle], datasets, args.workdir / f"report_{cat.name}_{args.tag}", kinds, progress=False)
        print(table(report), flush=True)
        summary[cat.name] = report["datasets"]
    out = args.workdir / f"accuracy_{args.tag}.json"
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
