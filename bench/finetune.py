"""Fine-tuning on new good images against training on everything from scratch (issue 24, item 2).

For each category, its good training photos are split in two halves (seeded). Three bundles, each
calibrated on its own training holdout at the same rate:

- scratch: `inspect train CAT --steps N` on every good training photo.
- half: `inspect train HALF_A --steps N` on the first half only.
- fine-tuned: a copy of `half`, then `inspect train COPY --add-good HALF_B --steps N/4`: the first model
  fine-tuned on the held-out half for a quarter of the steps, calibrated again by the command.

All three are scored on the category's labelled test set by the evaluation library (image AUROC of the
bundle as the line runs it); the question is whether `fine-tuned` reaches `scratch` within 0.01.
The halves are symlink folders in --workdir: the shared photos are never copied.

    OMP_NUM_THREADS=1 DIFFINSPECT_THREADS=1 python bench/finetune.py ../shared/datasets/magnetic_tile \
        ../shared/datasets/ball_screw --workdir /tmp/ft --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffinspect.data.datasets import normal_images
from diffinspect.evaluation.evaluate import evaluate

ARMS = ("scratch", "half", "finetuned")


def run(*args: str) -> float:
    """`inspect ARGS`; returns the seconds it took."""
    print("$ inspect", " ".join(args), flush=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "diffinspect", *args], check=True)
    return time.monotonic() - t0


def halves(category: Path, folder: Path, seed: int) -> tuple[Path, Path]:
    """Two folders of symlinks, each to one half of the category's good training photos."""
    good = normal_images(category)
    order = np.random.default_rng(seed).permutation(len(good))
    cut = len(good) // 2
    out = []
    for name, idx in (("a", order[:cut]), ("b", order[cut:])):
        view = folder / f"{category.name}_{name}"
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        for i in idx:
            (view / good[i].name).symlink_to(good[i].resolve())
        out.append(view)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("categories", nargs="+", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("finetune_run"))
    ap.add_argument("--steps", type=int, default=300, help="training steps from scratch; fine-tune: a quarter")
    ap.add_argument("--rate", type=float, default=0.05, help="false-reject rate every bundle is calibrated at")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    summary = {}
    for cat in args.categories:
        w = args.workdir / cat.name
        a, b = halves(cat, w, args.seed)
        bundles = {arm: w / arm for arm in ARMS}
        steps = str(args.steps)
        seconds = {
            "scratch": run("train", str(cat), "--out", str(bundles["scratch"]), "--steps", steps, "--overwrite"),
            "half": run("train", str(a), "--out", str(bundles["half"]), "--steps", steps, "--overwrite"),
        }
        for arm in ("scratch", "half"):
            run("calibrate", str(bundles[arm]), "--false-reject-rate", str(args.rate))
        shutil.rmtree(bundles["finetuned"], ignore_errors=True)
        shutil.copytree(bundles["half"], bundles["finetuned"])
        seconds["finetuned"] = run("train", str(bundles["finetuned"]), "--add-good", str(b),
                                   "--steps", str(max(1, args.steps // 4)))
        report = evaluate([bundles[arm] for arm in ARMS], [cat], w / "report", [])
        methods = next(iter(report["datasets"].values()))
        auroc = {arm: methods[arm]["image_auroc"] for arm in ARMS}
        summary[cat.name] = {"good_photos": len(normal_images(cat)), "half": len(normal_images(a)),
                             "steps": args.steps, "finetune_steps": max(1, args.steps // 4),
                             "image_auroc": auroc, "seconds": seconds,
                             "finetuned_minus_scratch": auroc["finetuned"] - auroc["scratch"],
                             "methods": methods}
        print(f"{cat.name}: image AUROC scratch {auroc['scratch']:.3f}, half {auroc['half']:.3f}, "
              f"fine-tuned {auroc['finetuned']:.3f} ({auroc['finetuned'] - auroc['scratch']:+.3f})", flush=True)
        (args.workdir / "finetune.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"figures in {args.workdir / 'finetune.json'}")


if __name__ == "__main__":
    main()
