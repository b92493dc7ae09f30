"""The tiles feed: frames scaled by tile_scale, cut into overlapping tiles, maps stitched back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from diffinspect.bundle import Bundle, plain, section
from diffinspect.config import load_config
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import Preprocess, read_image
from diffinspect.scoring.diffusion import CALIBRATION_FILE

TILES = Preprocess(image_size=32, feed="tiles", tile_scale=0.5)


def tiles_cfg(**over):
    base = {"model.size": "tiny", "data.image_size": 32, "data.feed": "tiles", "data.tile_scale": 0.5,
            "train.batch_size": 8, "train.steps": 4, "data.holdout": 0.2}
    base.update(over)
    return load_config(overrides=base)


@pytest.fixture(scope="module")
def tiles_line(tmp_path_factory) -> Path:
    """The synthetic metal line at 96 x 96 plus frames of another size and aspect (96 high, 140 wide)."""
    from diffinspect.data.synthetic import make_line

    tmp = tmp_path_factory.mktemp("tiles")
    root = make_line(tmp / "metal", "metal", n_train=30, n_test_good=12, n_test_defect=10, size=96, seed=0)
    wide = make_line(tmp / "wide", "metal", n_train=10, n_test_good=6, n_test_defect=6, size=140, seed=1)
    for src in wide.rglob("*.png"):
        # Squash 140 x 140 to 140 wide x 96 high; masks follow their images (nearest keeps them binary).
        interp = cv2.INTER_NEAREST if src.parent.parent.name == "ground_truth" else cv2.INTER_AREA
        dst = root / src.relative_to(wide)
        dst = dst.with_name("w" + dst.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst), cv2.resize(cv2.imread(str(src), cv2.IMREAD_UNCHANGED), (140, 96), interpolation=interp))
    return root


@pytest.fixture(scope="module")
def tiles_bundle(tiles_line, tmp_path_factory) -> Path:
    """A tiny U-Net trained on tiles, calibrated on the line's good test frames."""
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.train import train

    out = tmp_path_factory.mktemp("tiles_bundle") / "tiny"
    train(tiles_line, out, tiles_cfg(**{"train.steps": 60}))
    calibrate(out, tiles_line / "test" / "good", false_reject_rate=0.1, backend="torch", fallback=False)
    return out


def test_tile_grid_covers_the_canvas():
    frame = np.zeros((150, 205, 1), np.uint8)
    canvas = TILES.canvas(frame)
    assert canvas.shape == (75, 102, 1)  # half the native resolution
    grid = TILES.tile_grid(canvas.shape)
    ys, xs = sorted({y for y, _ in grid}), sorted({x for _, x in grid})
    assert ys == [0, 16, 32, 43] and xs == [0, 16, 32, 48, 64, 70]  # stride 16, last flush with the edge
    assert len(grid) == len(ys) * len(xs)
    covered = np.zeros(canvas.shape[:2], int)
    for y, x in grid:
        covered[y:y + 32, x:x + 32] += 1
    assert covered.min() >= 1
    assert TILES.tiles(canvas).shape == (len(grid), 32, 32, 1)


def test_small_frames_are_padded_to_one_tile():
    frame = np.arange(40 * 20, dtype=np.uint8).reshape(40, 20, 1)  # 20 x 10 after scaling
    canvas = TILES.canvas(frame)
    assert canvas.shape == (32, 32, 1) and TILES.tile_grid(canvas.shape) == [(0, 0)]
    # Edge-replicated: the padding repeats the last row and column of the scaled frame.
    assert (canvas[20:, :10] == canvas[19, :10]).all() and (canvas[:20, 10:] == canvas[:20, 9:10]).all()
    rgb = TILES.canvas(np.zeros((300, 10, 3), np.uint8))
    assert rgb.shape == (150, 32, 3)


def test_map_to_frame_puts_a_hot_spot_back_where_it_was():
    prep = Preprocess(image_size=32, feed="tiles", tile_scale=0.5, roi=(10, 20, 180, 110))
    frame = np.zeros((150, 205, 1), np.uint8)
    frame[95:101, 140:146] = 255  # hot spot inside the ROI
    amap = prep.canvas(frame)[..., 0].astype(np.float32)  # a map on the canvas grid, hot where the spot is
    assert amap.shape == (55, 90)
    full = prep.map_to_frame(amap, frame.shape)
    assert full.shape == (150, 205)
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert 93 <= y <= 103 and 138 <= x <= 148
    assert full[:20].max() == full.min()  # nothing outside the ROI
    # A frame smaller than a tile: the padding is cut off again before the map is scaled back.
    small = np.zeros((30, 50, 1), np.uint8)
    small[20:24, 40:44] = 255
    full = TILES.map_to_frame(TILES.canvas(small)[..., 0].astype(np.float32), small.shape)
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert 18 <= y <= 25 and 38 <= x <= 45


def test_a_frame_scores_as_its_worst_tile():
    from diffinspect.scoring.diffusion import DiffusionDetector

    layout = [((32, 96), [(0, 0), (0, 32), (0, 64)]), ((32, 32), [(0, 0)])]
    maps = np.zeros((4, 32, 32), np.float32)
    maps[1, 5, 5] = 9.0
    det = DiffusionDetector(SimpleNamespace(name="fake"), TILES, None, 1.0, None)  # type: ignore[arg-type]
    canvases, scores = det.assemble(maps, np.array([0.1, 3.0, 0.2, 0.7]), layout)
    assert scores.tolist() == [3.0, 0.7]
    assert [c.shape for c in canvases] == [(32, 96), (32, 32)]
    assert canvases[0].max() == 9.0


def test_old_manifests_feed_whole_frames():
    prep = section(Preprocess, {"color": "gray", "image_size": 64, "resize": "pad", "roi": None})
    assert prep.feed == "frame" and section(Preprocess, plain(TILES)) == TILES


def test_tiles_train_calibrate_and_score(tiles_bundle, tiles_line, tmp_path):
    from diffinspect.scoring.inspector import Inspector
    from diffinspect.scoring.loader import load_detector
    from diffinspect.scoring.score import score_paths

    b = Bundle.load(tiles_bundle)
    assert b.manifest.preprocess.feed == "tiles" and b.manifest.preprocess.tile_scale == 0.5
    assert b.manifest.calibration.n == 18
    with np.load(b.file(CALIBRATION_FILE)) as z:
        assert z["mean"].shape[1:] == (32, 32) and z["scores"].shape == (18,)
        check_frames, check_scores = z["selfcheck_frames"], z["selfcheck_scores"]
    assert check_frames.shape == (4, 32, 32, b.manifest.model.channels) and check_scores.shape == (4,)

    det = load_detector(tiles_bundle, backend="torch")
    # The stored self-check scores are the engine's own per-tile scores.
    np.testing.assert_allclose(det.run_fitted(check_frames)[1], check_scores, rtol=1e-4, atol=1e-4)
    test = labelled_set(tiles_line)
    frames = [read_image(s.path, det.preprocess.color) for s in test.samples]
    assert {f.shape[:2] for f in frames} == {(96, 96), (96, 140)}
    result = det.score(frames)
    assert result.scores.shape == (len(frames),) and np.isfinite(result.scores).all()
    assert len(result.maps) == len(frames)
    for f, amap in zip(frames, result.maps, strict=True):
        assert amap.shape == det.preprocess.canvas(f).shape[:2]
    labels = np.array([s.is_anomalous for s in test.samples])
    assert result.scores[labels].mean() > result.scores[~labels].mean()
    assert roc_auc_score(labels, result.scores) > 0.75

    wide = [s.path for s in test.samples if s.path.name.startswith("w")][:2]
    paths = [test.samples[0].path, *wide]
    recs = list(score_paths(Inspector(det), paths, tmp_path, overlays="all"))
    assert [r.error for r in recs] == [None] * 3
    assert all(cv2.imread(r.overlay) is not None for r in recs)


def test_tiles_evaluate_pixel_pairs(tiles_bundle, tiles_line):
    from diffinspect.evaluation.evaluate import _detector_method, mask_on_map
    from diffinspect.scoring.loader import load_detector

    det = load_detector(tiles_bundle, backend="torch")
    sample = next(s for s in labelled_set(tiles_line).samples if s.mask is not None and s.path.name.startswith("w"))
    frame = read_image(sample.path, det.preprocess.color)
    scores, maps, _ = _detector_method("diffusion", det).score([frame])
    mask = read_image(sample.mask, "gray")[..., 0] > 127
    part, m = mask_on_map(mask, maps[0], det.preprocess)
    assert part.shape == m.shape == (48, 70) and m.any()


@pytest.mark.slow
def test_tile_training_is_deterministic_and_resumes(tiles_line, tmp_path):
    from diffinspect import DiffinspectError
    from diffinspect.train import train

    def weights(path: Path) -> dict:
        return torch.load(Bundle.load(path).file("weights.pt"), weights_only=True)

    a = weights(train(tiles_line, tmp_path / "a", tiles_cfg(**{"train.steps": 6})).path)
    b = weights(train(tiles_line, tmp_path / "b", tiles_cfg(**{"train.steps": 6})).path)
    assert all(torch.equal(a[k], b[k]) for k in a)

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(DiffinspectError, match="--resume"):
        train(tiles_line, tmp_path / "c", tiles_cfg(**{"train.steps": 6}), on_step=interrupt)
    c = weights(train(tiles_line, tmp_path / "c", tiles_cfg(**{"train.steps": 6}), resume=True).path)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
