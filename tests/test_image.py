"""Decoding: the reduced JPEG decode (a fraction of the work where scoring needs fewer pixels)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffinspect.data.image import decode_image, jpeg_reduction
from diffinspect.data.synthetic import render_frame


def encoded(ext: str, size: tuple[int, int] = (600, 800), gray: bool = False) -> tuple[np.ndarray, bytes]:
    img, _ = render_frame("washer", np.random.default_rng(0), max(size))
    img = np.ascontiguousarray(img[:size[0], :size[1]])
    pixels = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if gray else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    return img, cv2.imencode(ext, pixels)[1].tobytes()


def test_the_reduction_keeps_both_sides_at_least_min_side() -> None:
    assert [jpeg_reduction(800, 600, s) for s in (50, 75, 76, 150, 151, 300, 301)] == [8, 8, 4, 4, 2, 2, 1]


@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_a_reduced_jpeg_decode_is_the_frame_averaged(color: str) -> None:
    _, data = encoded(".jpg", gray=color == "gray")
    full = decode_image(data, color)
    for side, r in ((150, 4), (300, 2), (1000, 1)):
        small = decode_image(data, color, min_side=side)
        assert small.shape == (600 // r, 800 // r, full.shape[2]) and small.dtype == np.uint8
        # What the DCT scaling gives is the frame averaged over r x r blocks, within JPEG's own error.
        area = cv2.resize(full, (800 // r, 600 // r), interpolation=cv2.INTER_AREA).reshape(small.shape)
        assert np.abs(small.astype(int) - area).mean() < 2.0


def test_other_formats_are_decoded_whole() -> None:
    _, png = encoded(".png")
    assert decode_image(png, "rgb", min_side=100).shape == (600, 800, 3)
