"""Synthetic defects pasted onto good images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.data.anomalies import ANOMALY_KINDS, anomaly_set, paste_anomaly, perlin_noise
from diffinspect.data.synthetic import render_frame


def _good(product: str, h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    img, _ = render_frame(product, np.random.default_rng(seed), size=max(h, w))
    img = np.ascontiguousarray(img[:h, :w])
    if channels == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None]
    return img


def _check_pasted(img: np.ndarray, out: np.ndarray, mask: np.ndarray, min_change: float = 10.0) -> None:
    assert out.shape == img.shape and out.dtype == np.uint8
    assert mask.shape == img.shape[:2] and mask.dtype == np.float32
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    solid = mask > 0.5
    assert solid.any(), "empty mask"
    diff = np.abs(out.astype(np.int16) - img.astype(np.int16)).reshape(*img.shape[:2], -1).max(axis=2)
    # Nothing changes outside the mask; inside it the change is clearly visible.
    assert (mask[diff > 0] > 0).all()
    assert diff[solid].mean() >= min_change


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (96, 40)])
def test_paste_each_kind(kind: str, channels: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng([ANOMALY_KINDS.index(kind), channels, *shape])
    for product in ("metal", "washer"):
        img = _good(product, *shape, channels)
        before = img.copy()
        out, mask = paste_anomaly(img, rng, kind)
        assert np.array_equal(img, before), "the input image was modified in place"
        _check_pasted(img, out, mask)


@pytest.mark.parametrize("level", [8, 128, 247])
def test_contrast_follows_the_image_on_dark_mid_and_bright_images(level: int) -> None:
    # A near-white part cannot get brighter and a black one cannot get darker: every kind must still show.
    rng = np.random.default_rng(level)
    noise = np.random.default_rng(1).normal(0, 3, (64, 64, 3))
    img = np.clip(level + noise, 0, 255).astype(np.uint8)
    for kind in ANOMALY_KINDS:
        for _ in range(3):
            out, mask = paste_anomaly(img, rng, kind)
            _check_pasted(img, out, mask, min_change=12.0)


def test_crack_is_dark_where_there_is_room() -> None:
    img = _good("fabric", 96, 96, 3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out, mask = paste_anomaly(img, rng, "crack")
        solid = mask > 0.5
        assert out[solid].mean() < img[solid].mean() - 15


def test_two_dimensional_gray_input() -> None:
    img = _good("metal", 64, 72, 1)[:, :, 0]
    out, mask = paste_anomaly(img, np.random.default_rng(0), "spot")
    assert out.shape == (64, 72) and mask.shape == (64, 72)
    _check_pasted(img[:, :, None], out[:, :, None], mask)


def test_source_of_other_size_and_channels() -> None:
    img = _good("metal", 64, 64, 1)
    source = _good("fabric", 90, 100, 3)
    rng = np.random.default_rng(3)
    for kind in ("perlin_blend", "cutpaste"):
        for _ in range(4):
            out, mask = paste_anomaly(img, rng, kind, source=source)
            _check_pasted(img, out, mask)


def test_random_kind_is_deterministic_per_seed() -> None:
    img = _good("washer", 64, 64, 3)
    a = paste_anomaly(img, np.random.default_rng(11))
    b = paste_anomaly(img, np.random.default_rng(11))
    c = paste_anomaly(img, np.random.default_rng(12))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    _check_pasted(img, *a)


def test_sizes_vary_and_include_small_defects() -> None:
    img = _good("metal", 128, 128, 3)
    rng = np.random.default_rng(0)
    for kind in ("spot", "scratch", "perlin_blend", "cutpaste", "chip"):
        areas = [int((paste_anomaly(img, rng, kind)[1] > 0.5).sum()) for _ in range(30)]
        assert min(areas) <= 60, f"{kind}: no small defects (min area {min(areas)} px)"
        assert max(areas) >= 4 * max(min(areas), 1), f"{kind}: sizes hardly vary {areas}"


def test_perlin_noise_shape_range_and_smoothness() -> None:
    rng = np.random.default_rng(0)
    n = perlin_noise((70, 130), (3.5, 5.0), rng, octaves=1)
    assert n.shape == (70, 130) and n.dtype == np.float32
    assert np.abs(n).max() <= 1.05 and n.std() > 0.1
    # Smooth: neighbouring pixels differ far less than the field varies.
    assert np.abs(np.diff(n, axis=1)).mean() < 0.2 * n.std()
    assert not np.array_equal(n, perlin_noise((70, 130), (3.5, 5.0), rng))
    frac = perlin_noise((128, 128), (4, 4), rng, octaves=4)
    assert np.abs(frac).max() <= 1.05


def test_bad_inputs_raise() -> None:
    rng = np.random.default_rng(0)
    img = _good("metal", 64, 64, 3)
    with pytest.raises(DiffinspectError, match="perlin_blend"):
        paste_anomaly(img, rng, "dent")
    with pytest.raises(DiffinspectError, match="32"):
        paste_anomaly(img[:20], rng, "spot")
    with pytest.raises(DiffinspectError, match="uint8"):
        paste_anomaly(img.astype(np.float32), rng, "spot")
    with pytest.raises(DiffinspectError, match="C = 1 or 3"):
        paste_anomaly(np.zeros((64, 64, 4), np.uint8), rng, "spot")


def test_anomaly_set() -> None:
    good = [_good("metal", 64, 64, 3, seed=s) for s in range(3)] + [_good("washer", 48, 80, 3)]
    rng = np.random.default_rng(0)
    images, masks = anomaly_set(good, rng, per_image=2)
    assert len(images) == len(masks) == 8
    for i, (out, mask) in enumerate(zip(images, masks, strict=True)):
        _check_pasted(good[i // 2], out, mask)

    images, masks = anomaly_set(good[:1], rng, kinds=["crack"])
    assert len(images) == 1
    assert images[0][masks[0] > 0.5].mean() < good[0][masks[0] > 0.5].mean()

    with pytest.raises(DiffinspectError, match="band"):
        anomaly_set(good, rng, kinds=["scratch", "blob"])
    with pytest.raises(DiffinspectError):
        anomaly_set(good, rng, per_image=0)
