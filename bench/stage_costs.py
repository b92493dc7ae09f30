"""The cost of per-frame stages alone, in ms: health signals, the overlay (render + write) and the
frame term's classical embedding (feature recipe v1, the 128 px square, and v2, three scales).

Best of --repeats calls (other jobs on a shared machine only slow a call), on 4:3 frames of the synthetic
washer line at 0.3, 2 and 5 MP with a map that has one hot spot. Run it against two checkouts, one after
the other, to compare versions of scoring/health.py and scoring/overlay.py on the same machine:

    PYTHONPATH=/path/to/main python bench/stage_costs.py
    PYTHONPATH=. python bench/stage_costs.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.synthetic import render_frame
from diffinspect.scoring import overlay
from diffinspect.scoring.features import SCALES, classical_embedding
from diffinspect.scoring.health import _work_gray, measure, pose_profiles

SIZES = {"0.3": 640, "2": 1600, "5": 2592}


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def frame_and_map(width: int) -> tuple[np.ndarray, np.ndarray]:
    h = width * 3 // 4
    img = np.ascontiguousarray(render_frame("washer", np.random.default_rng(0), width)[0][(width - h) // 2:][:h])
    u = (np.arange(64) + 0.5) / 64
    spot = 6.0 * np.exp(-((u[None, :] - 0.7) ** 2 + (u[:, None] - 0.3) ** 2) / 0.01)
    noise = np.random.default_rng(1).normal(0, 0.4, (64, 64))
    return img, cv2.resize((spot + noise).astype(np.float32), (width, h), interpolation=cv2.INTER_LINEAR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    jpeg = "fmt" in overlay.overlay_name.__code__.co_varnames  # [watch] overlay_format on this checkout
    print(f"{'MP':>4} {'health ms':>9} {'render ms':>9} {'+ PNG ms':>9} {'+ JPEG ms':>9} "
          + " ".join(f"{f'embed v{v} ms':>12}" for v in SCALES) + "  overlay px")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in a.sizes.split(","):
            img, amap = frame_and_map(SIZES[mp])
            reference = pose_profiles(_work_gray(img))
            image = overlay.render_overlay(img, amap, 3.0, 2.5, "ng", 2.0)
            health = best_ms(lambda: measure(img, reference), a.repeats)  # noqa: B023
            render = best_ms(lambda: overlay.render_overlay(img, amap, 3.0, 2.5, "ng", 2.0), a.repeats)  # noqa: B023
            png = best_ms(lambda: overlay.save_overlay(Path(tmp) / "o.png", img, amap, 3.0, 2.5, "ng", 2.0),  # noqa: B023
                          a.repeats)
            jpg = (best_ms(lambda: overlay.save_overlay(Path(tmp) / "o.jpg", img, amap, 3.0, 2.5, "ng", 2.0),  # noqa: B023
                           a.repeats) if jpeg else float("nan"))
            embed = [best_ms(lambda v=v: classical_embedding(img, version=v), a.repeats) for v in SCALES]  # noqa: B023
            print(f"{mp:>4} {health:9.1f} {render:9.1f} {png:9.1f} {jpg:9.1f} "
                  + " ".join(f"{e:12.1f}" for e in embed) + f"  {image.shape[1]} x {image.shape[0]}")


if __name__ == "__main__":
    main()
