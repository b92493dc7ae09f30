"""Metrics against values computed by hand on tiny cases."""

from __future__ import annotations

import numpy as np
import pytest

from diffinspect.evaluation import metrics


def test_image_auroc_and_ap_by_hand() -> None:
    labels = [False, False, True, True]
    scores = [0.1, 0.4, 0.35, 0.8]
    # Pairs (defective, good) ranked right: 0.35>0.1, 0.8>0.1, 0.8>0.4; wrong: 0.35<0.4 -> 3/4.
    assert metrics.image_auroc(labels, scores) == pytest.approx(0.75)
    # Ranked: 0.8 (defect, P=1, R=1/2), 0.4 (good), 0.35 (defect, P=2/3, R=1) -> 1/2*1 + 1/2*2/3.
    assert metrics.image_ap(labels, scores) == pytest.approx(0.5 + 1 / 3)


def test_image_metrics_undefined_with_one_class() -> None:
    assert metrics.image_auroc([False, False], [0.1, 0.2]) is None
    assert metrics.image_ap([True, True], [0.1, 0.2]) is None
    assert metrics.f1_max([False], [0.3]) is None


def test_threshold_metrics_by_hand() -> None:
    labels = [False] * 5 + [True] * 4
    # Good: one above the threshold (a false reject); 0.5 sits exactly on it and is OK (strictly above is NG).
    scores = [0.1, 0.2, 0.6, 0.3, 0.5, 0.7, 0.8, 0.4, 0.9]
    m = metrics.threshold_metrics(labels, scores, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 4)
    assert m["false_reject_rate"] == pytest.approx(1 / 5)
    assert m["miss_rate"] == pytest.approx(1 / 4)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)


def test_threshold_metrics_undefined_parts() -> None:
    m = metrics.threshold_metrics([False, False], [0.1, 0.2], 0.5)
    assert m["false_reject_rate"] == 0.0
    assert m["miss_rate"] is None and m["recall"] is None and m["precision"] is None and m["f1"] is None
    assert metrics.threshold_metrics([True], [1.0], None)["f1"] is None


def test_f1_max_by_hand() -> None:
    # Top two only: P=1, R=2/3, F1=0.8. Down to 0.2: P=3/4, R=1, F1=6/7 (the best). Down to 0.1: F1=0.75.
    assert metrics.f1_max([False, True, False, True, True], [0.1, 0.2, 0.3, 0.8, 0.9]) == pytest.approx(6 / 7)


def test_pixel_auroc_by_hand() -> None:
    good = np.array([[0, 1], [2, 3]], dtype=np.float32)
    bad = np.array([[2.5, 0], [1, 2]], dtype=np.float32)
    mask = np.array([[1, 0], [0, 0]], dtype=np.uint8)
    # One defect pixel (2.5) against 7 good pixels [0,1,2,3,0,1,2]: above 6 of them.
    assert metrics.pixel_auroc([good, bad], [None, mask]) == pytest.approx(6 / 7)
    assert metrics.pixel_auroc([good], [None]) is None


def _two_images(region1: float, region2: tuple[float, float, float]) -> tuple[list, list]:
    """Two 4x4 images; the second has a 1-pixel region at (0,0) and a 3-pixel region on its last row.

    7 of the 28 defect-free pixels score 5 (FPR 0.25 at threshold 5), the others 0.
    """
    good = np.zeros((4, 4), np.float32)
    good[0, :] = 5
    good[1, :3] = 5
    bad = np.zeros((4, 4), np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 255
    mask[3, 1:] = 255
    bad[0, 0] = region1
    bad[3, 1:] = region2
    return [good, bad], [None, mask]


def test_aupro_by_hand_regions_weigh_equally() -> None:
    maps, masks = _two_images(10.0, (3.0, 3.0, 3.0))
    # Curve: (0,0) -> t=10 (0, 0.5): the 1-pixel region counts as half the overlap, not a quarter
    # -> t=5 (0.25, 0.5) -> t=3 (0.25, 1) -> t=0 (1, 1). Area to 0.3: 0.25*0.5 + 0.05*1.
    assert metrics.aupro(maps, masks) == pytest.approx((0.25 * 0.5 + 0.05 * 1.0) / 0.3)


def test_aupro_by_hand_interpolates_at_the_limit() -> None:
    maps, masks = _two_images(10.0, (3.0, 3.0, 0.0))
    # At t=3 region 2 is 2/3 covered: PRO = (1 + 2/3)/2 = 5/6 at FPR 0.25; next point (1, 1).
    # PRO at FPR 0.3 by linear interpolation: 5/6 + (1/6)(0.05/0.75) = 38/45.
    expected = (0.25 * 0.5 + 0.05 * (5 / 6 + 38 / 45) / 2) / 0.3
    assert metrics.aupro(maps, masks) == pytest.approx(expected)


def test_aupro_ties_are_interpolated_linearly() -> None:
    # Region 2 ties with the 21 zero-score good pixels: from (0, 0.5) straight to (1, 1).
    maps, masks = _two_images(10.0, (0.0, 0.0, 0.0))
    maps[0][:] = 0
    assert metrics.aupro(maps, masks) == pytest.approx((0.5 * 0.3 + 0.25 * 0.09) / 0.3)


def test_aupro_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(0)
    masks = [np.zeros((8, 8), np.uint8) for _ in range(3)]
    masks[1][2:4, 2:5] = 1
    masks[2][5:7, 0:2] = 1
    masks[2][0, 7] = 1
    noise = [rng.uniform(0, 1, (8, 8)).astype(np.float32) for _ in masks]
    perfect = [n + 10 * m for n, m in zip(noise, masks, strict=True)]
    inverted = [-p for p in perfect]
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert metrics.aupro(inverted, masks) == pytest.approx(0.0)
    assert metrics.pixel_auroc(inverted, masks) == pytest.approx(0.0)


def test_aupro_undefined_without_regions() -> None:
    assert metrics.aupro([np.zeros((4, 4))], [None]) is None
    assert metrics.aupro([np.zeros((4, 4))], [np.ones((4, 4))]) is None  # no defect-free pixel


def test_masks_are_resized_to_the_map_with_nearest_and_a_warning() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 0:4] = 255
    amap = np.zeros((4, 4), np.float32)
    amap[0:2, 0:2] = 1.0
    warnings: list[str] = []
    assert metrics.aupro([amap], [mask], warnings=warnings) == pytest.approx(1.0)
    assert any("nearest" in w and "8x8" in w for w in warnings)
    small = metrics.resize_mask(mask, (4, 4))
    assert small.dtype == bool and small.sum() == 4
