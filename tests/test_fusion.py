"""The frame-level term's fusion rules: sum (the rule every earlier bundle used) and max."""

from types import SimpleNamespace

import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.config import load_config
from diffinspect.scoring.diffusion import FrameTerm


class _Copod:
    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float64)

    def score(self, frames):
        return SimpleNamespace(scores=self.scores[: len(frames)])


def test_max_lets_either_detector_flag_a_part_and_sum_adds_them():
    diffusion = np.array([0.0, 10.0, 0.0, 1.0])  # robust z with scale (0, 1): as is
    copod = _Copod([0.0, 0.0, 8.0, 1.0])
    frames = [None] * 4
    summed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0)).combine(diffusion, frames)
    maxed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").combine(diffusion, frames)
    assert summed.tolist() == [0.0, 10.0, 8.0, 2.0]
    assert maxed.tolist() == [0.0, 10.0, 8.0, 1.0]  # a part both call mildly odd is not pushed up
    assert FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").to_dict()["rule"] == "max"


def test_unknown_rule_is_refused_in_config_and_manifest():
    with pytest.raises(DiffinspectError, match="score.fusion"):
        load_config(overrides={"score.fusion": "mean"})
    with pytest.raises(DiffinspectError, match="frame-term rule"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "mean")


def test_conformal_p_values_count_calibration_scores_and_rank_past_the_largest():
    from diffinspect.scoring.diffusion import conformal_p

    cal = np.sort(np.arange(1.0, 20.0))  # n = 19
    p = conformal_p(cal, np.array([0.0, 10.0, 19.0, 25.0, 40.0]))
    assert p[:3].tolist() == [1.0, 11 / 20, 2 / 20]  # (1 + #{cal >= s}) / (n + 1)
    assert 0 < p[4] < p[3] < 1 / 20  # beyond every good part: still ordered, never tied


def test_minp_rejects_when_either_p_value_is_below_half_the_rate():
    rng = np.random.default_rng(0)
    cal_d, cal_c = rng.normal(size=199), rng.normal(size=199)
    term = FrameTerm(_Copod(np.r_[0.0, 9.0, 0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", (cal_d, cal_c))
    fused = term.combine(np.array([0.0, 0.0, 9.0]), [None] * 3)
    threshold = -np.log(0.01 / 2)
    assert (fused > threshold).tolist() == [False, True, True]
    # Good parts: the bound is over calibration draws (one draw's rate varies), so average over many.
    rates = []
    for _ in range(1000):
        cal = (rng.normal(size=199), rng.normal(size=199))
        good = FrameTerm(_Copod(rng.normal(size=200)), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", cal)
        rates.append(np.mean(good.combine(rng.normal(size=200), [None] * 200) > threshold))
    assert 0.008 <= np.mean(rates) <= 0.011  # the union bound 2 x 1 / 200, nearly attained
    with pytest.raises(DiffinspectError, match="calibration scores"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp")


def test_calibrate_with_minp_stores_the_rule_and_scores_round_trip(trained_bundle, line_dir, tmp_path):
    import shutil

    from diffinspect.bundle import Bundle
    from diffinspect.data.image import read_image
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.scoring.loader import load_detector

    path = tmp_path / "b"
    shutil.copytree(trained_bundle, path)
    with Bundle.load(path).updating() as up:
        up.manifest["score"]["fusion"] = "minp"
    calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, log=lambda *_: None)
    cal = Bundle.load(path).manifest["calibration"]
    assert cal["frame_term"]["rule"] == "minp" and cal["threshold"] == pytest.approx(-np.log(0.05))
    det = load_detector(path, backend="torch")
    frames = [read_image(p, det.preprocess.color) for p in sorted((line_dir / "test").glob("*/*.png"))]
    scores = det.score(frames).scores
    assert np.all(np.isfinite(scores)) and np.all(scores >= -np.log(1.0) - 1e-12)
    # Too few calibration images for a 5 % rate under Bonferroni (39, 24 given): the sum rule, said in the log.
    lines: list[str] = []
    calibrate(path, line_dir / "test" / "good", false_reject_rate=0.05, log=lines.append)
    assert Bundle.load(path).manifest["calibration"]["frame_term"]["rule"] == "sum"
    assert any("summing" in line for line in lines)
