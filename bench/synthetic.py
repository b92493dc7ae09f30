"""Cost of the synthetic data the training loop and the demo make, side by side in one run.

- Perlin noise (the shape of a pasted defect, train/targets.py): one 128 x 128 field, best of 20, and its
  share of one batch of 16 pasted defects against the time of making that batch's good images.
- make_line (the demo's synthetic production line): 140 images at 128 px, seconds per image.

These were timing asserts in the unit tests; on shared cores they measured the neighbours, so they live here.

    python bench/synthetic.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from diffinspect.data.anomalies import perlin_noise
from diffinspect.data.synthetic import make_line


def best_of(n: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    one = best_of(20, lambda: perlin_noise((128, 128), (4, 4), rng))
    fractal = best_of(20, lambda: perlin_noise((128, 128), (4, 4), rng, octaves=4))
    with tempfile.TemporaryDirectory() as tmp:
        n = 60 + 40 + 40
        start = time.perf_counter()
        make_line(Path(tmp), product="washer", n_train=60, n_test_good=40, n_test_defect=40, size=128)
        line_s = time.perf_counter() - start
    per_image = line_s / n
    print(f"perlin noise 128 px, 1 octave   {one * 1e3:8.2f} ms")
    print(f"perlin noise 128 px, 4 octaves  {fractal * 1e3:8.2f} ms  ({fractal / one:.1f}x one octave)")
    print(f"make_line, {n} images at 128 px  {line_s:8.2f} s   ({per_image * 1e3:.1f} ms per image)")
    print(f"a batch of 16 defect shapes vs 16 synthetic images: {16 * one / (16 * per_image):.3f}")


if __name__ == "__main__":
    main()
