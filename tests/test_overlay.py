"""Overlays: shape, heat and outline where the map is hot, a readable verdict header, PNG output."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.scoring.overlay import (
    CONTOUR_COLOUR,
    LABEL_COLOURS,
    MAX_SIDE,
    MIN_SIDE,
    render_overlay,
    write_overlay,
)


def hot_spot_map(size: int = 16, peak: float = 6.0) -> np.ndarray:
    """z-map of the same field at any resolution: ~0 except a spot at (x, y) = (0.78, 0.28) of the frame."""
    u = (np.arange(size) + 0.5) / size
    d2 = (u[None, :] - 0.78) ** 2 + (u[:, None] - 0.28) ** 2
    return (peak * np.exp(-d2 / 0.1 ** 2)).astype(np.float32)


def band_height(image: np.ndarray, frame_height: int) -> int:
    return image.shape[0] - frame_height


def test_shape_dtype_and_small_frames_are_upscaled() -> None:
    small = np.full((64, 64, 1), 128, np.uint8)
    out = render_overlay(small, hot_spot_map(), 3.2, 2.5, "ng", pixel_threshold=2.0)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[1] == MIN_SIDE and band_height(out, MIN_SIDE) > 0
    big = np.full((300, 500, 3), 128, np.uint8)
    out = render_overlay(big, None, 1.0, 2.5, "ok")
    assert out.shape[1] == 500 and band_height(out, 300) > 0  # no upscaling when already readable


@pytest.mark.parametrize(("h", "w"), [(8, 20000), (20000, 8), (8, 1000), (9000, 6000)])
def test_thin_and_huge_frames_keep_their_shape_within_bounded_pixels(h: int, w: int) -> None:
    out = render_overlay(np.full((h, w), 128, np.uint8), hot_spot_map(), 3.2, 2.5, "ng", pixel_threshold=2.0)
    header = max(32, round(0.09 * out.shape[1]))
    body = out.shape[0] - header
    assert out.shape[1] <= MAX_SIDE and body <= MAX_SIDE
    scale = MAX_SIDE / max(h, w)  # the long side at the bound, the short one in proportion (to a pixel)
    assert abs(body - h * scale) <= 1 and abs(out.shape[1] - w * scale) <= 1


def test_heat_and_contour_sit_over_the_hot_region() -> None:
    frame = np.full((64, 64), 128, np.uint8)  # flat gray: every colour comes from the overlay
    out = render_overlay(frame, hot_spot_map(), 3.2, 2.5, "ng", pixel_threshold=2.0)
    img = out[band_height(out, MIN_SIDE):].astype(int)  # (256, 256): map pixel (x, y) -> 16x, 16y
    hot = img[72, 200]  # the spot's centre on the 256 px display
    far = img[200, 40]
    assert hot[2] > hot[0] + 40  # red over the spot (BGR)
    assert np.abs(far - 128).max() <= 2  # far away the photo shows untouched
    white = np.all(img >= np.array(CONTOUR_COLOUR) - 20, axis=2)
    ys, xs = np.nonzero(white)
    assert len(ys) > 20
    # Every outline pixel lies on a ring around the spot (radius ~0.1 sqrt(ln 3) of 256 px), none far away.
    dist = np.hypot(xs - 200, ys - 72)
    assert np.all((dist > 15) & (dist < 45)), (dist.min(), dist.max())


def test_map_of_any_size_is_stretched_to_the_frame() -> None:
    frame = np.full((256, 256, 3), 128, np.uint8)
    coarse = render_overlay(frame, hot_spot_map(8), 3.0, 2.5, "ng", pixel_threshold=2.0)
    fine = render_overlay(frame, hot_spot_map(64)[None], 3.0, 2.5, "ng", pixel_threshold=2.0)
    for out in (coarse, fine):
        img = out[band_height(out, 256):].astype(int)
        assert img[72, 200, 2] > img[72, 200, 0]  # hot near (x=200, y=72) in both
        assert np.abs(img[200, 40] - 128).max() <= 2


def test_header_colour_follows_the_label_and_carries_text() -> None:
    frame = np.full((64, 64), 90, np.uint8)
    bands = {}
    for label in ("ok", "ng", "error"):
        out = render_overlay(frame, None, 3.21, 2.5, label)
        bands[label] = out[:band_height(out, MIN_SIDE)]
        colours, counts = np.unique(bands[label].reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == LABEL_COLOURS[label]  # background is the label colour
        assert np.all(bands[label] >= 230, axis=2).sum() > 100  # white text pixels
    assert not np.array_equal(bands["ok"], bands["ng"])
    assert not np.array_equal(bands["ng"], bands["error"])
    # The text changes with the score: a different number draws different pixels.
    other = render_overlay(frame, None, 1.05, 2.5, "ok")
    assert not np.array_equal(other[:len(bands["ok"])], bands["ok"])


def test_without_a_map_the_frame_is_shown_as_is() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = render_overlay(rgb, None, float("nan"), 2.5, "error")
    body = out[band_height(out, MIN_SIDE):]
    expected = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), None, fx=4, fy=4,
                          interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(body, expected)


def test_write_overlay_creates_the_folder_and_writes_png(tmp_path) -> None:
    image = render_overlay(np.full((64, 64), 128, np.uint8), hot_spot_map(), 3.0, 2.5, "ng", 2.0)
    path = write_overlay(tmp_path / "a" / "b" / "frame_001.png", image)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_COLOR), image)


def test_a_large_frame_is_drawn_shrunk_with_its_content_in_place() -> None:
    """A 5 MP frame drawn at MAX_SIDE: the photo area-averaged (a fine checkerboard turns mid-gray, not
    aliased stripes), its halves where they were, the heat over the spot of the map."""
    h, w = 1944, 2592
    frame = np.zeros((h, w), np.uint8)
    frame[:, w // 2:] = (np.indices((h, w - w // 2)).sum(0) % 2 * 255).astype(np.uint8)  # 1 px checkerboard
    out = render_overlay(frame, cv2.resize(hot_spot_map(64), (w, h)), 3.0, 2.5, "ng", pixel_threshold=2.0)
    img = out[band_height(out, round(h * MAX_SIDE / w)):].astype(int)
    assert img.shape[:2] == (round(h * MAX_SIDE / w), MAX_SIDE)
    dh, dw = img.shape[:2]
    assert np.abs(img[dh - 40:, 20:dw // 2 - 20]).max() <= 2  # black half, no heat there
    checker = img[dh - 40:, dw // 2 + 20:dw - 20]
    assert np.abs(checker - 127.5).max() <= 3  # averaged, not sampled
    hot = img[round(0.28 * dh), round(0.78 * dw)]
    assert hot[2] > hot[0] + 40


def test_write_overlay_writes_jpeg_for_a_jpg_path(tmp_path) -> None:
    image = render_overlay(np.full((64, 64), 128, np.uint8), hot_spot_map(), 3.0, 2.5, "ng", 2.0)
    path = write_overlay(tmp_path / "frame_001.jpg", image)
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    back = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert back.shape == image.shape and np.abs(back.astype(int) - image).mean() < 3  # lossy, close


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(DiffinspectError):
        render_overlay(np.zeros((8, 8), np.float32), None, 1.0, 2.0, "ok")
    with pytest.raises(DiffinspectError):
        render_overlay(np.zeros((8, 8), np.uint8), np.zeros((2, 3, 4)), 1.0, 2.0, "ok")
