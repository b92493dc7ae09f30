"""Decoding: the reduced read (a JPEG decoded reduced by its DCT, a fraction of the work where scoring needs
fewer pixels; any other format decoded whole and area-averaged to the same scale)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffinspect.data.image import at_read_scale, decode_image, jpeg_reduction
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


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff"])
def test_other_formats_are_decoded_whole_then_read_at_the_jpeg_scale(ext: str) -> None:
    """A lossless frame is decoded whole and area-averaged by the factor a JPEG of it is reduced by, so
    every format reaches scoring and health at one scale (and reads as the JPEG does, to its error)."""
    img, data = encoded(ext)
    whole = decode_image(data, "rgb")
    assert whole.shape == (600, 800, 3)
    assert decode_image(data, "rgb", min_side=1000).shape == whole.shape  # no reduction keeps the frame
    small = decode_image(data, "rgb", min_side=100)
    assert small.shape == (150, 200, 3)
    assert np.array_equal(small, at_read_scale(whole, 100))
    jpeg = decode_image(encoded(".jpg")[1], "rgb", min_side=100)
    assert np.abs(small.astype(int) - jpeg).mean() < 2.0
    gray = decode_image(data, "gray", min_side=100)
    assert gray.shape == (150, 200, 1)


def test_read_scale_rounds_sides_up_as_libjpeg_does() -> None:
    _, data = encoded(".jpg", (601, 803))
    reduced = decode_image(data, "rgb", min_side=150)
    assert reduced.shape == (151, 201, 3)
    assert at_read_scale(decode_image(data, "rgb"), 150).shape == reduced.shape
    assert at_read_scale(np.zeros((601, 803, 1), np.uint8), 150).shape == (151, 201, 1)


def test_a_reduced_decode_keeps_the_verdicts(calibrated_bundle) -> None:  # noqa: ANN001
    """Good and defective 1024 px JPEG frames, scored whole and decoded at a quarter of their size (what
    `inspect watch` does where no health profile needs the whole frame): the same labels, scores within
    a tenth of the good parts' score spread, the maps on the frame's own grid and alike."""
    from diffinspect.scoring.inspector import Inspector

    insp = Inspector.load(calibrated_bundle, backend="torch")
    side = insp.preprocess.read_side(Inspector.fallback(calibrated_bundle).detector.feature_size)
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
