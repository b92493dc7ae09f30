"""Choosing the model input shape from the training frames (`inspect train` without --image-size).

Stretching every frame to one square erases what a line cares about: a 1250 x 500 frame squeezed to
64 x 64 loses 20x along its long side and 8x along the short one, and a 2 px crack vanishes; on a tall
set, an input with the aspect ratio kept (64 x 160) finds defects the 64 px square misses. So the input
keeps the frames' median aspect ratio, and its short side is the larger of DEFAULT_SIDE and what keeps a
defect of `defect_size` native pixels at MIN_DEFECT_PX model pixels, within a pixel budget (training and
scoring time grow with it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffinspect.data.image import ImageError, ImageSize, input_hw, read_image, size_record
from diffinspect.models import MIN_IMAGE_SIZE, image_multiple

DEFAULT_SIDE = 64  # the short side when defects are not small: what every bundle used before
MIN_DEFECT_PX = 2.0  # model pixels the smallest defect the user names must keep
# Input pixel budget (2.5x the 64 px square holds a 1:2.5 frame at 64 px short side; 4x is 128 x 128):
# time per step grows with it, so a larger input needs --image-size and the time that goes with it.
MAX_PIXELS = 128 * 128
SAMPLE_FRAMES = 32  # frames whose sizes are read (all of them when fewer)


@dataclass(frozen=True)
class Geometry:
    image_size: ImageSize  # one side, or (height, width)
    frame: tuple[int, int]  # median native (height, width) of the sampled frames, after the ROI crop
    frames_read: int
    defect_size: int
    reason: str

    def to_dict(self) -> dict:
        return {"image_size": size_record(self.image_size), "frame": list(self.frame),
                "frames_read": self.frames_read, "defect_size": self.defect_size, "reason": self.reason}


def frame_sizes(paths: Sequence[Path], roi: Sequence[int] | None = None,
                sample: int = SAMPLE_FRAMES) -> list[tuple[int, int]]:
    """Native (height, width) after the ROI crop of up to `sample` evenly spaced frames; unreadable skipped."""
    paths = list(paths)
    step = max(1, len(paths) // sample)
    out = []
    for p in paths[::step][:sample]:
        try:
            h, w = read_image(p, "gray").shape[:2]
        except (ImageError, OSError):
            continue
        if roi is not None:
            x, y, rw, rh = roi
            h, w = max(0, min(y + rh, h) - max(y, 0)), max(0, min(x + rw, w) - max(x, 0))
        if h > 0 and w > 0:
            out.append((h, w))
    return out


def _round_to(value: float, m: int, lo: int, down: bool = False) -> int:
    return max(m * (math.floor(value / m) if down else round(value / m)), m * math.ceil(lo / m))


def choose_geometry(sizes: Sequence[tuple[int, int]], defect_size: int, kind: str, model_size: str,
                    max_pixels: int = MAX_PIXELS) -> Geometry:
    """The model input for frames of these native sizes (see the module docstring)."""
    if not sizes:
        return Geometry(DEFAULT_SIDE, (0, 0), 0, defect_size, "no frame sizes readable: the default square")
    arr = np.asarray(sizes, np.float64)
    fh, fw = (int(v) for v in np.median(arr, axis=0))
    aspect = float(np.median(arr[:, 1] / arr[:, 0]))  # width / height
    native_short = float(np.median(arr.min(axis=1)))
    long_over_short = max(aspect, 1 / aspect)
    # Never enlarge beyond the frames' own pixels: that adds cost and no detail.
    short = min(max(DEFAULT_SIDE, MIN_DEFECT_PX * native_short / defect_size), native_short)
    short = max(short, MIN_IMAGE_SIZE)
    why = [f"{defect_size} px defects keep {short * defect_size / native_short:.1f} model px"]
    if short * short * long_over_short > max_pixels:
        short = math.sqrt(max_pixels / long_over_short)
        why = [f"the {max_pixels} px budget caps it ({defect_size} px defects keep "
               f"{short * defect_size / native_short:.1f} model px; --image-size to go larger)"]
    long = short * long_over_short
    # The multiple depends on the size (deeper U-Nets, larger DiT patches): round, and round again to the
    # larger multiple until the rounded size needs no larger one (multiples are powers of 2).
    m = image_multiple(kind, model_size, (round(short), round(long)))
    while True:
        s, lg = _round_to(short, m, MIN_IMAGE_SIZE), _round_to(long, m, MIN_IMAGE_SIZE)
        if s * lg > max_pixels:  # rounding up must not leave the budget
            s, lg = _round_to(short, m, MIN_IMAGE_SIZE, True), _round_to(long, m, MIN_IMAGE_SIZE, True)
        need = image_multiple(kind, model_size, (s, lg))
        if s % need == 0 and lg % need == 0:
            break
        m = max(m, need)
    h, w = (s, lg) if aspect >= 1 else (lg, s)
    size: ImageSize = h if h == w else (h, w)
    reason = (f"{h}x{w} (height x width) for frames of about {fh}x{fw}: aspect ratio {aspect:.2f} kept, "
              f"sides multiples of {m} for the {kind}; " + "; ".join(why))
    return Geometry(size, (fh, fw), len(sizes), defect_size, reason)


def describe_size(size: ImageSize) -> str:
    h, w = input_hw(size)
    return f"{h} px" if h == w else f"{h}x{w} px"
