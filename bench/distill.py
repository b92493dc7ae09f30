"""Distilled students against the teacher on a labelled category: image AUROC and CPU time per frame.

Rows: the teacher at 10 and 25 DDIM steps, the undistilled weights at 1, 2 and 4 steps (the 1-step
row is the plain one-step x̂0 prediction), and students distilled to 1, 2 and 4 steps (each into a
copy of the bundle under --work; an existing copy with a student of that step count is reused with
--reuse). Every row uses the same per-pixel statistics recipe (Stats.fit on raw terms of up to 64
training images) and the bundle's map recipe, so only the sampler differs.

    python bench/distill.py BUNDLE CATEGORY [--iterations N | --max-minutes M] [--work DIR] [--reuse]

Targets: the 2-step student within 0.01 AUROC of the 10-step teacher and >= 4x faster; the 1-step
student above the undistilled one-step prediction.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from diffinspect.bundle import Bundle, is_bundle
from diffinspect.config import DISTILL_DEFECT_SHARE
from diffinspect.data.datasets import labelled_set
from diffinspect.evaluation.metrics import image_auroc
from diffinspect.models.from_bundle import load_denoiser, load_graph
from diffinspect.models.scoring import ScoringGraph
from diffinspect.scoring.diffusion import Stats
from diffinspect.train.distill import distill
from diffinspect.train.selection import read_frames

MAX_REFERENCE = 64
TIMED_FRAMES = 16


def batches(frames: np.ndarray, n: int = 32):
    for i in range(0, len(frames), n):
        yield torch.from_numpy(np.ascontiguousarray(frames[i:i + n]))


@torch.inference_mode()
def auroc(graph: ScoringGraph, reference: np.ndarray, frames: np.ndarray, labels: np.ndarray) -> float:
    stats = Stats.fit(np.concatenate([graph.raw_terms(b).numpy() for b in batches(reference)]))
    mean, std = torch.from_numpy(stats.mean), torch.from_numpy(stats.std)
    scores = np.concatenate([graph(b, mean, std)[1].numpy() for b in batches(frames)])
    return float(image_auroc(labels, scores))


@torch.inference_mode()
def ms_per_frame(graphs: list[ScoringGraph], frames: np.ndarray, rounds: int = 5) -> list[float]:
    """Median CPU wall time of scoring one frame (batch of 1), per graph. The graphs are timed in
    interleaved rounds (each graph once per round, on the same frames) so load from other jobs on a
    shared machine hits every row alike."""
    one = [torch.from_numpy(frames[i:i + 1].copy()) for i in range(min(TIMED_FRAMES, len(frames)))]
    times: list[list[float]] = [[] for _ in graphs]
    for r in range(rounds + 1):
        for g, out in zip(graphs, times, strict=True):
            k = len(g.term_names)
            mean, std = torch.zeros(k, *frames.shape[1:3]), torch.ones(k, *frames.shape[1:3])
            for f in one:
                t0 = time.perf_counter()
                g(f, mean, std)
                if r:  # round 0 warms up
                    out.append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def student_bundle(src: Path, work: Path, steps: int, share: float, args: argparse.Namespace) -> Bundle:
    dst = work / f"student-{steps}-heal{share:g}"
    if args.reuse and is_bundle(dst):
        b = Bundle.load(dst)
        if b.manifest.student is not None and b.manifest.student.steps == steps:
            print(f"reusing the {steps}-step student in {dst}")
            return b
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    with Bundle.load(dst).updating("bench") as up:
        up.manifest.calibration = None  # the bench uses its own statistics: skip re-calibration
    t0 = time.time()
    distill(dst, steps=steps, teacher_steps=args.teacher_steps, iterations=args.iterations,
            max_minutes=args.max_minutes, device=args.device, defect_share=share)
    print(f"  distilled in {(time.time() - t0) / 60:.1f} min")
    return Bundle.load(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("category", type=Path)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--teacher-steps", type=int, default=10)
    ap.add_argument("--students", default="1,2,4")
    ap.add_argument("--work", type=Path, default=Path("bench_distill"))
    ap.add_argument("--reuse", action="store_true", help="Reuse students already distilled under --work.")
    ap.add_argument("--defect-shares", default=f"{DISTILL_DEFECT_SHARE:g}",
                    help="Comma-separated shares of student inputs with a pasted defect to heal; a student "
                         "per share and step count.")
    ap.add_argument("--device", default="auto", help="Device for distillation (scoring is timed on the CPU).")
    args = ap.parse_args()
    torch.manual_seed(0)

    b = Bundle.load(args.bundle)
    prep, recipe, schedule = b.manifest.preprocess, b.recipe, b.schedule
    ref_paths = b.manifest.training.paths_on_disk()
    pick = np.random.default_rng(0).permutation(len(ref_paths))[:MAX_REFERENCE]
    reference = np.stack(read_frames([ref_paths[i] for i in sorted(pick)], prep))
    test = labelled_set(args.category)
    frames = np.stack(read_frames([s.path for s in test.samples], prep))
    labels = np.array([s.is_anomalous for s in test.samples])
    print(f"{test.name}: {int((~labels).sum())} good / {int(labels.sum())} defective test images, "
          f"{len(reference)} reference images, {prep.image_size} px, t* = {recipe.t_star}, "
          f"torch threads {torch.get_num_threads()}")

    teacher_net = load_denoiser(b)
    rows: list[tuple[str, int, ScoringGraph]] = [
        (f"teacher {n} steps", n, ScoringGraph(teacher_net, schedule, recipe, n)) for n in (args.teacher_steps, 25)]
    rows += [("undistilled one-step x0" if s == 1 else f"undistilled {s} steps", s,
              ScoringGraph(teacher_net, schedule, recipe, s)) for s in (1, 2, 4)]
    args.work.mkdir(parents=True, exist_ok=True)
    shares = [float(v) for v in args.defect_shares.split(",") if v.strip()]
    for share in shares:
        for s in (int(v) for v in args.students.split(",") if v.strip()):
            name = f"student {s} steps" + ("" if share == DISTILL_DEFECT_SHARE else f", heal {share:g}")
            rows.append((name, s, load_graph(student_bundle(args.bundle, args.work, s, share, args), "student")))

    timings = ms_per_frame([g for _, _, g in rows], frames)
    results = [(name, n, auroc(g, reference, frames, labels), ms)
               for (name, n, g), ms in zip(rows, timings, strict=True)]
    base_auc, base_ms = results[0][2], results[0][3]
    print(f"\n{'sampler':26s} {'steps':>5s} {'AUROC':>7s} {'vs T10':>7s} {'ms/frame':>9s} {'speed-up':>8s}")
    for name, n, auc, ms in results:
        print(f"{name:26s} {n:5d} {auc:7.3f} {auc - base_auc:+7.3f} {ms:9.2f} {base_ms / ms:7.1f}x")
    by = {name: (auc, ms) for name, _, auc, ms in results}
    if "student 2 steps" in by:
        auc, ms = by["student 2 steps"]
        print(f"\n2-step student within 0.01 AUROC of the teacher: {auc >= base_auc - 0.01}; "
              f">= 4x faster: {base_ms / ms >= 4} ({base_ms / ms:.1f}x)")
    if "student 1 steps" in by:
        print(f"1-step student above the undistilled one-step: "
              f"{by['student 1 steps'][0] > by['undistilled one-step x0'][0]}")


if __name__ == "__main__":
    main()
