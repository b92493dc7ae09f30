"""Health signals on frames read reduced: do the formats agree, and does a defocus still show?

`inspect watch` reads a large frame at 1/2 to 1/8 of its size (Preprocess.read_side, 256 px a side for the
default bundle): a JPEG reduced by its DCT as it decodes, any other format decoded whole and area-averaged
by the same factor, and `inspect calibrate` fits the health profile on its frames read so. Two questions,
on good frames of the synthetic line (the bench's 2 and 5 MP frames, bench/throughput.py's good_frame, and
parts rendered at 2048 px, whose detail is native):

1. formats: each signal of the JPEG (quality 90) decoded reduced, and of the JPEG decoded whole then
   area-averaged, against the lossless frame area-averaged (what a PNG calibration set gives): the mean
   difference over the same frames, in standard deviations of the good frames' own values;
2. focus: how far a defocus of the camera (a Gaussian blur of sigma 1, 2, 4 native pixels) moves
   sharpness, in the same units, read whole (as before) and read reduced.

    PYTHONPATH=. python bench/read_scale.py
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import cv2
import numpy as np
from throughput import good_frame  # bench/throughput.py, beside this script

from diffinspect.data.image import at_read_scale, decode_image, jpeg_reduction
from diffinspect.data.synthetic import render_frame
from diffinspect.scoring.health import SIGNALS, fit_health, measure

READ_SIDE = 256  # Preprocess().read_side(128): the default bundle's
SETS: dict[str, Callable[[int], np.ndarray]] = {
    "bench 5 MP": lambda i: good_frame("5", 2, i),
    "bench 2 MP": lambda i: good_frame("2", 2, i),
    "washer 2048 px": lambda i: render_frame("washer", np.random.default_rng(i), 2048)[0][256:1792],
    "metal 2048 px": lambda i: render_frame("metal", np.random.default_rng(i), 2048)[0][256:1792],
}


def encoded(img: np.ndarray, ext: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    return cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)[1].tobytes()


def formats(frames: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per signal: (mean difference DCT-reduced - lossless area-averaged, JPEG area-averaged - lossless
    area-averaged) in good-frame standard deviations."""
    jpegs = [encoded(f, ".jpg") for f in frames]
    lossless = [decode_image(encoded(f, ".png"), "rgb", min_side=READ_SIDE) for f in frames]
    profile = fit_health(lossless)  # read_side None: these frames are already at the read scale
    assert profile is not None
    read = {"dct": [decode_image(j, "rgb", min_side=READ_SIDE) for j in jpegs],
            "area": [at_read_scale(decode_image(j, "rgb"), READ_SIDE) for j in jpegs]}
    out = {}
    for name in SIGNALS[:5]:
        good = profile.values[name]
        spread = good.std() or 1.0  # a signal that does not vary (a fixed part's offsets): plain units
        out[name] = np.array([(np.mean([measure(f, profile.reference)[name] for f in fr]) - good.mean()) / spread
                              for fr in read.values()])
    return out


def focus(frames: list[np.ndarray], sigmas: tuple[float, ...]) -> dict[str, list[float]]:
    """Mean sharpness shift of each blur, in good-frame standard deviations, read whole and reduced."""
    out = {}
    r = jpeg_reduction(frames[0].shape[1], frames[0].shape[0], READ_SIDE)
    for scale, read in (("whole", lambda f: f), (f"1/{r}", lambda f: at_read_scale(f, READ_SIDE))):
        good = np.array([measure(read(f))["sharpness"] for f in frames])
        out[scale] = [(np.mean([measure(read(cv2.GaussianBlur(f, (0, 0), s)))["sharpness"] for f in frames])
                       - good.mean()) / good.std() for s in sigmas]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=24, help="good frames per set")
    p.add_argument("--sigmas", default="1,2,4", help="defocus blurs, native pixels")
    a = p.parse_args()
    sigmas = tuple(float(s) for s in a.sigmas.split(","))
    for name, make in SETS.items():
        frames = [make(i) for i in range(a.frames)]
        h, w = frames[0].shape[:2]
        print(f"{name} ({w}x{h}, read at 1/{jpeg_reduction(w, h, READ_SIDE)}):")
        for signal, (dct, area) in formats(frames).items():
            print(f"  {signal:<11} JPEG reduced by its DCT {dct:+.3f} sd, JPEG whole area-averaged {area:+.3f} sd "
                  f"(against the lossless frames area-averaged)")
        for scale, shifts in focus(frames, sigmas).items():
            said = ", ".join(f"sigma {s:g}: {v:+.1f} sd" for s, v in zip(sigmas, shifts, strict=True))
            print(f"  sharpness read {scale:<5}: {said}")


if __name__ == "__main__":
    main()
