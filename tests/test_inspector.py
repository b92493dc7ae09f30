"""The Inspector: labels, p-values, error verdicts and maps on the frame grid; the one overlay rule and name."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect.data.image import Preprocess
from diffinspect.scoring.detector import Scored
from diffinspect.scoring.inspector import Inspector, conformal_p
from diffinspect.scoring.overlay import overlay_name, wants_overlay
from diffinspect.scoring.score import score_paths
from diffinspect.scoring.stages import FRAME_TERM, MAP, MODEL, PREPROCESS, StageClock
from diffinspect.scoring.threshold import conformal_threshold

CAL = np.arange(1.0, 100.0)  # n = 99 good parts' scores
ALPHA = 0.1


class Scripted:
    """A detector that answers with the scores (and maps, p-values) it is given."""

    name, backend, pixel_threshold = "diffusion", "scripted", 2.0

    def __init__(self, scores, maps=None, threshold: float = conformal_threshold(CAL, ALPHA), p_values=None,
                 preprocess: Preprocess | None = None) -> None:
        self.scores, self.maps, self.threshold, self.p_values = scores, maps, threshold, p_values
        self.preprocess = preprocess or Preprocess(color="gray", image_size=8)

    def score(self, frames: list[np.ndarray]) -> Scored:
        return Scored(np.asarray(self.scores, np.float64), self.maps, self.p_values)


def frames(n: int, shape: tuple[int, int] = (16, 16)) -> list[np.ndarray]:
    return [np.zeros((*shape, 1), np.uint8) for _ in range(n)]


def test_labels_and_conformal_p_values() -> None:
    scores = [0.5, 50.0, 89.5, 90.0, 91.0, 500.0]
    verdicts = Inspector(Scripted(scores), CAL).inspect(frames(len(scores)))
    assert [v.label for v in verdicts] == ["ok", "ok", "ok", "ok", "ng", "ng"]  # threshold: the 90th smallest, 90
    # (1 + #{cal >= s}) / (n + 1)
    assert [v.p_value for v in verdicts] == [1.0, 0.51, 0.11, 0.11, 0.1, 0.01]
    assert all(v.error is None for v in verdicts)
    # The conformal threshold and the p-value agree: NG exactly when p <= alpha.
    grid = np.linspace(-1, 101, 409)
    verdicts = Inspector(Scripted(grid), CAL).inspect(frames(len(grid)))
    assert all((v.label == "ng") == (v.p_value <= ALPHA) for v in verdicts)


def test_no_calibration_scores_no_p_value_and_the_rules_own_p_value_wins() -> None:
    assert [v.p_value for v in Inspector(Scripted([1.0, 200.0])).inspect(frames(2))] == [None, None]
    own = Inspector(Scripted([1.0, 200.0], p_values=np.array([0.7, 0.02])), CAL).inspect(frames(2))
    assert [v.p_value for v in own] == [0.7, 0.02]
    assert conformal_p(CAL, np.array([99.0, 100.0])).tolist() == [0.02, 0.01]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_score_that_is_not_a_finite_number_is_an_error_verdict(bad: float) -> None:
    ok, broken = Inspector(Scripted([1.0, bad]), CAL).inspect(frames(2))
    assert ok.label == "ok" and ok.error is None
    assert broken.label == "error" and broken.p_value is None
    assert "not a finite number" in broken.error and str(bad) in broken.error


def test_a_threshold_that_is_not_a_number_labels_nothing() -> None:
    verdicts = Inspector(Scripted([1.0, 500.0], threshold=float("nan")), CAL).inspect(frames(2))
    assert {v.label for v in verdicts} == {"error"} and all("threshold" in v.error for v in verdicts)


@pytest.mark.parametrize("n_scores", [1, 3])
def test_a_wrong_number_of_scores_gives_every_frame_an_error(n_scores: int) -> None:
    verdicts = Inspector(Scripted([1.0] * n_scores), CAL).inspect(frames(2))
    assert len(verdicts) == 2
    assert all(v.label == "error" and v.score is None and v.p_value is None for v in verdicts)
    assert all(f"returned {n_scores} scores for 2 frames" in v.error for v in verdicts)


def test_the_map_comes_back_on_the_frame_grid_of_a_roi_bundle() -> None:
    # ROI x=10, y=4, 20 x 12 px of a 30 x 40 frame; the model sees it stretched to 8 x 8.
    prep = Preprocess(color="gray", image_size=8, roi=(10, 4, 20, 12))
    grid = np.zeros((1, 8, 8), np.float32)
    grid[0, :, 4:] = 5.0  # the right half of the ROI is hot
    (v,) = Inspector(Scripted([1.0], maps=grid, preprocess=prep)).inspect(frames(1, (30, 40)))
    amap = v.map
    assert amap.shape == (30, 40) and v.grid_map.shape == (8, 8)
    inside = amap[4:16, 10:30]
    assert (inside[:, 12:] == 5.0).all() and (inside[:, :8] == 0.0).all()
    outside = np.ones((30, 40), bool)
    outside[4:16, 10:30] = False
    assert (amap[outside] == 0.0).all()  # the map's coldest value where the model never looked


def test_the_clock_gets_the_detectors_split_and_the_rest_as_its_model() -> None:
    class Slow(Scripted):
        def score(self, frames: list[np.ndarray]) -> Scored:
            time.sleep(0.05)  # 0.014 s of it split by the detector, the rest is its model's
            return Scored(np.ones(len(frames)), None, seconds={PREPROCESS: 0.01, FRAME_TERM: 0.004})

    clock = StageClock()
    Inspector(Slow([]), CAL).inspect(frames(2), clock)
    clock.count(2)
    ms = clock.ms_per_frame()
    assert list(ms) == [PREPROCESS, MODEL, MAP, FRAME_TERM]  # pipeline order
    assert (ms[PREPROCESS], ms[FRAME_TERM]) == pytest.approx((5.0, 2.0))
    assert ms[MODEL] >= 18.0 - 1e-6 and 0.0 <= ms[MAP] < ms[MODEL]


def test_the_overlay_rule() -> None:
    table = {(rule, label): wants_overlay(rule, label) for rule in ("all", "ng", "none") for label in
             ("ok", "ng", "error")}
    assert {k for k, v in table.items() if v} == {("all", "ok"), ("all", "ng"), ("ng", "ng")}


def test_the_overlay_name_is_per_frame_and_safe_for_any_file_name() -> None:
    name = overlay_name("/cam/a/part 7.png", 100, 5)
    assert name == overlay_name("/cam/a/part 7.png", 100, 5) and name.startswith("part_7-") and name.endswith(".png")
    others = {overlay_name("/cam/b/part 7.png", 100, 5), overlay_name("/cam/a/part 7.png", 101, 5),
              overlay_name("/cam/a/part 7.png", 100, 6)}
    assert len(others | {name}) == 4  # another folder, or a re-used file name: another overlay
    odd = overlay_name(os.fsdecode(b"/cam/bad\xff\xfe.png"), 1, 1)  # not UTF-8: lone surrogates
    assert odd.isascii() and odd.startswith("bad__-")
    assert overlay_name("/cam/\ud800.png", 1, 1).isascii()  # not even a file system name: still no error
    long = overlay_name("/cam/" + "x" * 300 + ".png", 1, 1)
    assert len(long) < 100 and overlay_name("/cam/.hidden.png", 1, 1)[0] != "."


def test_score_names_overlays_as_watch_does(tmp_path: Path) -> None:
    paths = []
    for folder in ("a", "b"):  # one file name in two folders: two overlays, not one overwritten
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "frame.png")
        cv2.imwrite(str(paths[-1]), np.full((16, 16), 50, np.uint8))
    maps = np.zeros((2, 8, 8), np.float32)
    records = list(score_paths(Inspector(Scripted([1.0, 95.0], maps=maps), CAL), paths, tmp_path / "ov",
                               overlays="ng"))
    assert [r.status for r in records] == ["ok", "ng"] and [r.p_value for r in records] == [1.0, 0.06]
    assert records[0].overlay is None  # the rule: NG only
    st = os.stat(paths[1])
    assert records[1].overlay == str(tmp_path / "ov" / overlay_name(str(paths[1]), st.st_size, st.st_mtime_ns))
    records = list(score_paths(Inspector(Scripted([1.0, 95.0], maps=maps), CAL), paths, tmp_path / "ov"))
    assert len({r.overlay for r in records}) == 2 and all(Path(r.overlay).exists() for r in records)
