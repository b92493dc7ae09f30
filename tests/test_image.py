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


def test_a_reduced_decode_keeps_the_verdicts(calibrated_bundle) -> None:  # noqa: ANN001
    """Good and defective 1024 px JPEG frames, scored whole and decoded at a quarter of their size (what
    `inspect watch` does where no health profile needs the whole frame): the same labels, scores within
    a tenth of the good parts' score spread, the maps on the frame's own grid and alike."""
    from diffinspect.scoring.inspector import Inspector

    insp = Inspector.load(calibrated_bundle, backend="torch")
    side = 2 * max(*insp.preprocess.hw, 128)  # the rule of Supervisor.decode_side
    rng = np.random.default_rng(5)
    whole, small, masks = [], [], []
    for defect in (None, None, None, "scratch", "spot", "missing"):
        img, mask = render_frame("metal", rng, 1024, defect)
        data = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        whole.append(decode_image(data, insp.preprocess.color))
        small.append(decode_image(data, insp.preprocess.color, min_side=side))
        masks.append(mask)
    assert small[0].shape[0] <= 1024 // 2  # reduced at least twice
    a = insp.inspect(whole)
    b = insp.inspect(small, shapes=[f.shape for f in whole])
    spread = float(np.std(insp.calibration_scores))
    assert [v.label for v in a] == [v.label for v in b]
    assert max(abs(x.score - y.score) for x, y in zip(a, b, strict=True)) <= 0.1 * spread
    for x, y, mask in zip(a, b, masks, strict=True):
        assert y.map.shape == x.map.shape == (1024, 1024)
        assert np.corrcoef(x.map.ravel(), y.map.ravel())[0, 1] > 0.95
        if mask.any():  # the defect stands out of the map (or not) alike
            on, off = mask > 0, mask == 0
            assert (y.map[on].mean() > y.map[off].mean()) == (x.map[on].mean() > x.map[off].mean())
