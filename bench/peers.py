"""diffinspect beside a peer at the same CPU budget: anomalib's DRAEM, which needs no pretrained weights.

For each category: DRAEM (bench/peer_draem.py) trains for --minutes CPU minutes (the process's CPU time
over its threads, so the same on a loaded machine) in its own virtual environment
(pinned below, made on first use: anomalib does not run beside the project's torch pin), on the same
training images as the diffinspect bundle `WORKDIR/<category>_<tag>` that bench/accuracy.py trained
for the same minutes, and scores the same test images and the bundle's held-out good images. Both
get one table: image AUROC, pixel AUROC, AUPRO, and misses at a false-reject threshold fitted
split-conformally on the held-out good images only (the rule `inspect calibrate` uses).

    python bench/accuracy.py ../shared/datasets/magnetic_tile ../shared/datasets/ball_screw \
        --workdir /tmp/acc --minutes 15
    python bench/peers.py ../shared/datasets/magnetic_tile ../shared/datasets/ball_screw \
        --workdir /tmp/acc --minutes 15

The peer's venv takes several GB (anomalib needs torchvision, which needs its matching torch build).
One torch job at a time: run this after bench/accuracy.py, not beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from accuracy import twins

from diffinspect.bundle import Bundle, is_bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.evaluation.metrics import aupro, image_auroc, pixel_auroc, threshold_metrics
from diffinspect.scoring.threshold import conformal_threshold, min_calibration_size

PEER_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "anomalib==2.7.0")
WORKER = Path(__file__).with_name("peer_draem.py")


def peer_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making the peer's venv in {venv} ({', '.join(PEER_PACKAGES)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def split_of(bundle: Path) -> tuple[list[Path], list[Path]]:
    """(training images, held-out good images) of a diffinspect bundle: the peer sees the same ones."""
    training = Bundle.load(bundle, verify=False).manifest.training
    return training.paths_on_disk(), training.paths_on_disk(held_out=True)


def figures(labels: np.ndarray, scores: np.ndarray, maps: list[np.ndarray], masks: list[np.ndarray | None],
            holdout_scores: np.ndarray, rate: float) -> dict:
    threshold = conformal_threshold(holdout_scores, rate)
    at = threshold_metrics(labels, scores, threshold)
    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(maps, masks),
            "aupro": aupro(maps, masks), "miss_rate": at["miss_rate"], "false_reject_rate": at["false_reject_rate"],
            "rate": rate}


def read_mask(path: Path | None) -> np.ndarray | None:
    import cv2

    return None if path is None else cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def run_draem(python: Path, category: Path, bundle: Path, minutes: list[float], size: int, folder: Path,
              rate: float | None = None) -> dict[float, dict]:
    """DRAEM trained once on the bundle's training images, scored after each of `minutes` CPU minutes
    (peer_draem.py): per budget, the figures (as `figures`, plus steps and the twin-free view), misses at
    `rate` (default: 1 %, or 2.5 % where the holdout cannot bound 1 %)."""
    train, holdout = split_of(bundle)
    test = labelled_set(category).samples
    lists = folder / category.name
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("\n".join(map(str, train)))
    (lists / "score.txt").write_text("\n".join(map(str, [s.path for s in test] + holdout)))
    out = lists / "draem.npz"
    subprocess.run([str(python), str(WORKER), "--train", str(lists / "train.txt"), "--score",
                    str(lists / "score.txt"), "--minutes", ",".join(f"{m:g}" for m in minutes), "--size", str(size),
                    "--out", str(out)], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    got = np.load(out)
    n = len(test)
    labels = np.array([s.is_anomalous for s in test])
    masks = [read_mask(s.mask) for s in test]
    rate = rate or (0.01 if len(holdout) >= min_calibration_size(0.01) else 0.025)
    twin = twins(category, bundle, 0.95)
    results = {}
    for m in minutes:
        maps = [a.astype(np.float32) for a in got[f"maps_{m:g}"][:n]]
        every = got[f"scores_{m:g}"].astype(np.float64)
        scores, held_out = every[:n], every[n:]
        figs = figures(labels, scores, maps, masks, held_out, rate)
        figs["steps"] = int(got[f"steps_{m:g}"])
        if twin is not None:  # the same view bench/accuracy.py reports as <category>_twin_free
            keep = ~twin
            figs["twin_free"] = figures(labels[keep], scores[keep], [a for a, k in zip(maps, keep, strict=True) if k],
                                        [a for a, k in zip(masks, keep, strict=True) if k], held_out, rate)
        results[m] = figs
    return results


def row(name: str, figs: dict) -> str:
    keys = ("image_auroc", "pixel_auroc", "aupro")
    cells = [f"{figs[k]:.3f}" if isinstance(figs.get(k), float) else "-" for k in keys]
    miss = figs.get("miss_rate")
    cells.append(f"{miss:.0%}" if isinstance(miss, float) else "-")
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("categories", nargs="+", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("accuracy_run"))
    ap.add_argument("--tag", default="default", help="bench/accuracy.py's tag of the diffinspect bundles")
    ap.add_argument("--minutes", type=float, default=15.0, help="DRAEM's training budget, in CPU minutes")
    ap.add_argument("--size", type=int, default=256, help="DRAEM's input side (anomalib's default: 256)")
    ap.add_argument("--venv", type=Path, default=None, help="the peer's venv (default: WORKDIR/peer-venv)")
    args = ap.parse_args()
    python = peer_python((args.venv or args.workdir / "peer-venv").resolve())
    ours = args.workdir / f"accuracy_{args.tag}.json"
    diffinspect = json.loads(ours.read_text()) if ours.exists() else {}
    folder = Path(tempfile.mkdtemp(prefix="peers_"))
    lines = ["| set, detector | image AUROC | pixel AUROC | AUPRO | misses |", "|---|---|---|---|---|"]
    results = {}
    for cat in args.categories:
        bundle = args.workdir / f"{cat.name}_{args.tag}"
        if not is_bundle(bundle):
            raise SystemExit(f"no bundle {bundle}: run bench/accuracy.py with the same --workdir first")
        draem = run_draem(python, cat, bundle, [args.minutes], args.size, folder)[args.minutes]
        results[cat.name] = draem
        mine = (diffinspect.get(cat.name) or {}).get(cat.name, {})
        for method in ("diffinspect", "copod_fallback"):
            if method in mine:
                lines.append(row(f"{cat.name}, {method.replace('_', ' ')}", mine[method]))
        classical = {k: v for k, v in mine.items() if k not in ("diffinspect", "copod_fallback")}
        if classical:
            best = max(classical, key=lambda k: classical[k].get("image_auroc") or 0.0)
            lines.append(row(f"{cat.name}, best classical ({best})", classical[best]))
        lines.append(row(f"{cat.name}, DRAEM {args.size} px ({draem['steps']} steps, {args.minutes:g} min)", draem))
        if "twin_free" in draem:
            free = (diffinspect.get(cat.name) or {}).get(f"{cat.name}_twin_free", {})
            if "diffinspect" in free:
                lines.append(row(f"{cat.name} twin-free, diffinspect", free["diffinspect"]))
            lines.append(row(f"{cat.name} twin-free, DRAEM", draem["twin_free"]))
        print("\n".join(lines), flush=True)
    (args.workdir / f"peers_{args.tag}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
