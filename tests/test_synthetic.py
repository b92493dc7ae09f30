"""The synthetic production line: frames, defects, MVTec layout, determinism."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.data.datasets import labelled_set, normal_images
from diffinspect.data.image import read_image
from diffinspect.data.synthetic import DEFECTS, PRODUCTS, make_line, render_frame


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize("product", PRODUCTS)
def test_good_frame_shape_and_empty_mask(product: str) -> None:
    img, mask = render_frame(product, np.random.default_rng(0), size=96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    assert not mask.any()
    # A real picture, not a flat or clipped field.
    assert 40 < img.mean() < 215 and img.std() > 5


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_is_labelled_and_changes_only_the_labelled_area(product: str, defect: str) -> None:
    for seed in range(3):
        good, empty = render_frame(product, np.random.default_rng(seed))
        bad, mask = render_frame(product, np.random.default_rng(seed), defect=defect)
        assert not empty.any()
        assert set(np.unique(mask)) == {0, 255}
        share = (mask > 0).mean()
        assert 0.002 < share < 0.08, f"{product}/{defect}: defect covers {share:.2%} of the frame"
        diff = np.abs(bad.astype(np.int16) - good).max(axis=2)
        # The same rng state renders the same part: the defect is the only difference ...
        near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
        assert diff[~near].max() == 0
        # ... and it is clearly visible where the mask says.
        assert diff[mask > 0].mean() > 20


def test_defect_stands_out_from_its_surroundings() -> None:
    # Independent of the good rendering: compare the defect with the ring of pixels around it.
    for product in ("metal", "fabric"):
        for defect in ("spot", "crack", "missing"):
            img, mask = render_frame(product, np.random.default_rng(5), defect=defect)
            inside = mask > 0
            near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
            ring = (cv2.dilate(mask, np.ones((11, 11), np.uint8)) > 0) & ~near
            gap = np.abs(img[inside].astype(float).mean(axis=0) - img[ring].astype(float).mean(axis=0)).max()
            assert gap > 20, f"{product}/{defect}: only {gap:.1f} grey levels from its surroundings"


def test_contamination_adds_colour_to_near_gray_metal() -> None:
    img, mask = render_frame("metal", np.random.default_rng(3), defect="contamination")
    chroma = img.astype(np.int16).max(axis=2) - img.astype(np.int16).min(axis=2)
    assert chroma[mask > 0].mean() > 3 * chroma[mask == 0].mean()


def test_defect_sizes_vary() -> None:
    rngs = [np.random.default_rng(s) for s in range(12)]
    areas = [(render_frame("fabric", rng, defect="spot")[1] > 0).sum() for rng in rngs]
    assert max(areas) > 1.5 * min(areas)


@pytest.mark.parametrize("product", PRODUCTS)
def test_good_frames_vary_but_stay_the_same_product(product: str) -> None:
    frames = [render_frame(product, np.random.default_rng(s))[0].astype(np.float32) for s in range(4)]
    for a, b in zip(frames, frames[1:], strict=False):
        assert np.abs(a - b).mean() > 2.0  # not one memorizable image
        assert abs(a.mean() - b.mean()) < 30  # but the same kind of picture


def test_washer_position_jitters() -> None:
    centres = []
    for s in range(6):
        img, _ = render_frame("washer", np.random.default_rng(s))
        bright = img.mean(axis=2) > 100  # the part, not the dark belt
        ys, xs = np.nonzero(bright)
        centres.append((xs.mean(), ys.mean()))
    spread = np.ptp(np.array(centres), axis=0)
    assert spread.max() > 1.0 and spread.max() < 12.0


@pytest.mark.parametrize("size", [32, 64, 100])
def test_other_sizes(size: int) -> None:
    for product in PRODUCTS:
        img, mask = render_frame(product, np.random.default_rng(1), size=size, defect="scratch")
        assert img.shape == (size, size, 3) and mask.shape == (size, size)
        assert mask.any()


def test_bad_arguments_raise() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DiffinspectError, match="metal"):
        render_frame("plastic", rng)
    with pytest.raises(DiffinspectError, match="scratch"):
        render_frame("metal", rng, defect="dent")
    with pytest.raises(DiffinspectError, match="size"):
        render_frame("metal", rng, size=16)


def test_make_line_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DiffinspectError, match="washer"):
        make_line(tmp_path, product="glass")
    with pytest.raises(DiffinspectError, match="contamination"):
        make_line(tmp_path, defects=("scratch", "bubble"))
    with pytest.raises(DiffinspectError, match="n_train"):
        make_line(tmp_path, n_train=-1)


def test_make_line_layout_and_counts(tmp_path: Path) -> None:
    root = make_line(tmp_path / "line", product="washer", n_train=5, n_test_good=3, n_test_defect=7, size=64)
    assert root == tmp_path / "line"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(5)]
    assert len(list((root / "test" / "good").iterdir())) == 3
    # 7 over 5 defect types: the first two get the remainder.
    counts = {d: len(list((root / "test" / d).glob("*.png"))) for d in DEFECTS}
    assert counts == {"scratch": 2, "spot": 2, "crack": 1, "missing": 1, "contamination": 1}
    for defect, n in counts.items():
        for i in range(n):
            m = cv2.imread(str(root / "ground_truth" / defect / f"{i:03d}_mask.png"), cv2.IMREAD_UNCHANGED)
            assert m.shape == (64, 64) and m.dtype == np.uint8
            assert set(np.unique(m)) == {0, 255}
    assert not (root / "ground_truth" / "good").exists()

    # The dataset reader sees exactly this, with a mask for every defect image.
    assert len(normal_images(root)) == 5
    ls = labelled_set(root)
    assert not ls.warnings
    assert len(ls.samples) == 3 + 7
    assert sorted({s.defect for s in ls.samples if s.is_anomalous}) == sorted(DEFECTS)
    assert all(s.mask is not None for s in ls.samples if s.is_anomalous)


def test_make_line_subset_of_defects(tmp_path: Path) -> None:
    root = make_line(tmp_path, product="metal", n_train=1, n_test_good=1, n_test_defect=4, size=48,
                     defects=("crack", "spot"))
    assert sorted(p.name for p in (root / "test").iterdir()) == ["crack", "good", "spot"]
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == ["crack", "spot"]


def test_png_is_rgb_not_bgr(tmp_path: Path) -> None:
    # Fabric is beige (red above blue); a BGR mix-up would flip that in the file.
    root = make_line(tmp_path, product="fabric", n_train=1, n_test_good=0, n_test_defect=0, size=64)
    img = read_image(root / "train" / "good" / "000.png", "rgb")
    assert img[..., 0].mean() > img[..., 2].mean() + 20


def test_make_line_is_deterministic(tmp_path: Path) -> None:
    args = dict(product="fabric", n_train=3, n_test_good=2, n_test_defect=5, size=64)
    a = _files(make_line(tmp_path / "a", seed=7, **args))
    b = _files(make_line(tmp_path / "b", seed=7, **args))
    c = _files(make_line(tmp_path / "c", seed=8, **args))
    assert len(a) == 3 + 2 + 5 + 5
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "ground_truth" not in k)


def test_split_counts_do_not_reshuffle_other_splits(tmp_path: Path) -> None:
    a = _files(make_line(tmp_path / "a", n_train=2, n_test_good=2, n_test_defect=5, size=48))
    b = _files(make_line(tmp_path / "b", n_train=4, n_test_good=2, n_test_defect=5, size=48))
    assert {k: v for k, v in a.items() if not k.startswith("train")} == \
        {k: v for k, v in b.items() if not k.startswith("train")}


