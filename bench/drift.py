"""Drift alarms on real photos: how fast each named alarm fires, and how often it fires for nothing.

Calibrates a cold-start COPOD bundle on CATEGORY/train/good (no torch), then feeds the drift monitor
(the one `inspect watch` runs per lane) streams of good test images: (a) unchanged, (b) 30 % darker,
(c) blurred (Gaussian, sigma 1 % of the frame side), (d) shifted by 8 % of the frame, right or down
(the uncovered band mirrors the surface next to it, as a moved camera sees more of it).

Each image's health signals and COPOD score are computed once per variant; streams are shuffled
passes over them (seeded; a new shuffle after each pass), so no part repeats within a pass, as on
a line. Frames until the alarm: streams of WARMUP unchanged frames, then changed frames, counted from
the first changed frame; "other alarms" are alarms of another kind raised in those streams (each
alarm should fire for its own cause only). False alarms: RUNS streams of LONG unchanged frames
(about 500 shuffled passes each) over the good test images; the alarms promise P(any, ever) <= 1/lam.

    python bench/drift.py ../shared/datasets/magnetic_tile [--bundle DIR] [--streams 20] [--runs 3] [--lam 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from diffinspect.bundle import Bundle, is_bundle
from diffinspect.data.datasets import list_images
from diffinspect.data.image import read_image
from diffinspect.line.drift import ALARMS, LAMBDA, DriftMonitor
from diffinspect.scoring.cold_start import calibrate_copod_only
from diffinspect.scoring.health import load_health, measure
from diffinspect.scoring.loader import load_fallback

WARMUP = 100
HORIZON = 200
LONG = 100_000


def darker(f: np.ndarray) -> np.ndarray:
    return np.clip(f.astype(np.float32) * 0.7 + 0.5, 0, 255).astype(np.uint8)


def blurred(f: np.ndarray) -> np.ndarray:
    out = cv2.GaussianBlur(f, (0, 0), 0.01 * min(f.shape[:2]))
    return out.reshape(f.shape)


def shifted(f: np.ndarray, axis: int) -> np.ndarray:
    h, w = f.shape[:2]
    # Whole pixels: a sub-pixel shift interpolates, which blurs the frame as well.
    m = np.float32([[1, 0, round(0.08 * w) if axis == 0 else 0], [0, 1, round(0.08 * h) if axis == 1 else 0]])
    return cv2.warpAffine(f, m, (w, h), borderMode=cv2.BORDER_REFLECT_101).reshape(f.shape)


def precompute(frames: list[np.ndarray], det, reference: np.ndarray) -> list[tuple]:
    scores = det.score(frames).scores
    out = []
    for f, s in zip(frames, scores, strict=True):
        out.append((measure(f, reference), float(s), "ng" if s > det.threshold else "ok"))
    return out


def run_stream(profile, pool_before: list[tuple], pool_after: list[tuple], rng, n_before: int, n_after: int,
               lam: float) -> list[tuple[int, str]]:
    """(frame index counted from the first changed frame, alarm kind) for every alarm raised."""
    mon = DriftMonitor(profile, lam)
    raised = []
    order: list[int] = []
    for i in range(n_before + n_after):
        pool = pool_before if i < n_before else pool_after
        if not order:
            order = list(rng.permutation(len(pool)))
        sig, score, status = pool[order.pop()]
        for ev in mon.update(sig, "copod", status, score, at=float(i)):
            if ev.state == "raised":
                raised.append((i - n_before + 1, ev.kind))
    return raised


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("category", type=Path)
    ap.add_argument("--bundle", type=Path, help="reuse a cold-start bundle (default: calibrate one in a temp dir)")
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lam", type=float, default=LAMBDA, help="the alarms' P(any false alarm, ever) is 1/lam")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    bundle = args.bundle
    if bundle is None or not is_bundle(bundle):
        bundle = bundle or Path(tmp.name) / "copod"
        t0 = time.perf_counter()
        calibrate_copod_only(args.category / "train" / "good", bundle)
        print(f"cold-start COPOD bundle calibrated on {args.category / 'train' / 'good'} in "
              f"{time.perf_counter() - t0:.0f} s")
    b = Bundle.load(bundle)
    profile = load_health(b)
    det = load_fallback(b)
    print(f"health profile: {profile.values['brightness'].size} good frames; alarms at P(any false alarm, ever) "
          f"<= 1/{args.lam:g}")
    files = list_images(args.category / "test" / "good")
    frames = [read_image(p, det.preprocess.color) for p in files]
    variants = {"(a) unchanged": frames, "(b) 30 % darker": [darker(f) for f in frames],
                "(c) blurred": [blurred(f) for f in frames],
                "(d) shifted right 8 %": [shifted(f, 0) for f in frames],
                "(d) shifted down 8 %": [shifted(f, 1) for f in frames]}
    expect = {"(b) 30 % darker": "lighting", "(c) blurred": "focus", "(d) shifted right 8 %": "camera",
              "(d) shifted down 8 %": "camera"}
    t0 = time.perf_counter()
    pools = {k: precompute(v, det, profile.reference) for k, v in variants.items()}
    per_frame = (time.perf_counter() - t0) / sum(len(v) for v in variants.values())
    print(f"{len(files)} good test images per variant; signals + COPOD score {per_frame * 1000:.1f} ms/frame")
    base = pools["(a) unchanged"]
    print(f"\n| stream | named alarm | frames until the alarm (median / max of {args.streams} streams) | "
          f"other alarms raised (all streams) |")
    print("|---|---|---|---|")
    for name, kind in expect.items():
        delays, others, missed = [], {}, 0
        for s in range(args.streams):
            rng = np.random.default_rng(1000 + s)
            raised = run_stream(profile, base, pools[name], rng, WARMUP, HORIZON, args.lam)
            hit = [i for i, k in raised if k == kind and i > 0]
            delays += hit[:1]
            missed += not hit
            for _, k in raised:
                if k != kind:
                    others[ALARMS[k]] = others.get(ALARMS[k], 0) + 1
        figure = (f"{int(np.median(delays))} / {max(delays)}" if delays else "-") + \
                 (f" ({missed} of {args.streams} streams missed within {HORIZON})" if missed else "")
        other = ", ".join(f"{k}: {v}" for k, v in others.items()) or "none"
        print(f"| {name} | {ALARMS[kind]} | {figure} | {other} |")
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for r in range(args.runs):
        rng = np.random.default_rng(r)
        for _, k in run_stream(profile, base, base, rng, LONG, 0, args.lam):
            counts[k] = counts.get(k, 0) + 1
    per = (time.perf_counter() - t0) / (args.runs * LONG)
    detail = ", ".join(f"{ALARMS[k]}: {v}" for k, v in counts.items()) or "none"
    print(f"| (a) unchanged | none | {sum(counts.values())} false alarms in {args.runs} x {LONG:,} frames "
          f"({detail}; monitor {per * 1e6:.0f} us/frame) | |")


if __name__ == "__main__":
    main()
