"""The frame-level term's fusion rules: sum (the rule every earlier bundle used), max and minp."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffinspect import DiffinspectError
from diffinspect.config import load_config
from diffinspect.scoring.diffusion import FrameTerm


class _Copod:
    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float64)

    def embed(self, frames):
        return np.zeros((len(frames), 0))

    def score_embeddings(self, embeddings):
        return self.scores[: len(embeddings)]


def test_max_lets_either_detector_flag_a_part_and_sum_adds_them():
    diffusion = np.array([0.0, 10.0, 0.0, 1.0])  # robust z with scale (0, 1): as is
    copod = _Copod([0.0, 0.0, 8.0, 1.0])
    frames = [None] * 4
    summed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0)).combine(diffusion, frames)
    maxed = FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").combine(diffusion, frames)
    assert summed.tolist() == [0.0, 10.0, 8.0, 2.0]
    assert maxed.tolist() == [0.0, 10.0, 8.0, 1.0]  # a part both call mildly odd is not pushed up
    assert FrameTerm(copod, 1.0, (0.0, 1.0), (0.0, 1.0), "max").record().rule == "max"


def test_unknown_rule_is_refused_in_config_and_manifest():
    with pytest.raises(DiffinspectError, match="score.fusion"):
        load_config(overrides={"score.fusion": "mean"})
    with pytest.raises(DiffinspectError, match="frame-term rule"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "mean")


def test_min_rank_p_ranks_every_part_among_all_n_plus_one():
    from diffinspect.scoring.threshold import min_rank_p

    cal = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])  # n = 4 parts, 2 detectors
    new = np.array([[0.0, 5.0, 2.5], [0.0, 0.0, 2.5]])
    p = min_rank_p(cal, new)
    # [0, 0]: best rank 5 of 5, every part is at least as extreme. [5, 0]: rank 1 by detector 0; the
    # part scoring 4 by detector 1 is rank 1 there, and without a tie-break equal ranks count against
    # the new part: 2 of 5. [2.5, 2.5]: rank 3 by both; the other parts have best ranks 1, 2, 2, 1.
    assert p.tolist() == [1.0, 2 / 5, 1.0]
    # With the sums as tie-break: [5, 0] ties the rank-1 part [1, 4] on the sum too (5), which counts
    # against it: 2 of 5; [5, 1] (sum 6) is alone at the top: 1 of 5.
    ties = cal.sum(0)
    assert min_rank_p(cal, np.array([[5.0, 5.0], [0.0, 1.0]]), ties, np.array([5.0, 6.0])).tolist() == [2 / 5, 1 / 5]


def test_minp_rejects_at_the_rate_exactly_from_n_one_over_alpha():
    from diffinspect.scoring.threshold import min_rank_p, min_rank_threshold

    rng = np.random.default_rng(0)
    n, rate = 99, 0.01  # a Bonferroni union of two p-values needed 199 here
    threshold = min_rank_threshold(n, rate)
    cal_d, cal_c = rng.normal(size=n), rng.normal(size=n)
    term = FrameTerm(_Copod(np.r_[0.0, 9.0, 0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", (cal_d, cal_c))
    fused = term.combine(np.array([0.0, 0.0, 9.0]), [None] * 3)
    assert (fused > threshold).tolist() == [False, True, True]  # either detector alone can reject
    rates, exact = [], True
    for _ in range(1000):  # the bound is over calibration draws, so average over many
        cal = (rng.normal(size=n), rng.normal(size=n))
        d, c = rng.normal(size=200), rng.normal(size=200)
        good = FrameTerm(_Copod(c), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", cal).combine(d, [None] * 200)
        reject = good > threshold
        p = min_rank_p(np.stack(cal), np.stack([d, c]), cal[0] + cal[1], d + c)
        exact &= bool(np.array_equal(reject, p <= rate))
        rates.append(reject.mean())
    assert exact  # the tie-break never moves a part across the threshold
    assert 0.0085 <= np.mean(rates) <= 0.0115  # exactly 1 / (n + 1) in expectation
    with pytest.raises(DiffinspectError, match="calibration scores"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp")
    with pytest.raises(DiffinspectError, match="paired"):
        FrameTerm(_Copod([0.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", (np.zeros(3), np.zeros(4)))


def test_minp_with_confidence_holds_for_this_threshold_in_all_but_5_percent_of_calibration_draws():
    """The peeled best-rank rule as scoring runs it (FrameTerm, level_threshold): over 1,000 calibration
    draws of 299 parts (the fewest for 1 % at 95 %), its good-part reject rate exceeds alpha in at most
    5 % of them. Good parts' scores are independent uniforms, so the rate of the region "d > c1 or
    c > c2" is 1 - c1 * c2 exactly; the verdicts are checked to be that region."""
    from diffinspect.scoring.inspector import conformal_p
    from diffinspect.scoring.threshold import (
        binom_sf,
        conditional_rank,
        level_threshold,
        min_rank_cutoffs,
        peel_blocks,
        peel_p,
    )

    rng = np.random.default_rng(3)
    n, rate, delta, draws = 299, 0.01, 0.05, 1000
    threshold = level_threshold(n, peel_blocks(n, rate, delta))
    rates = []
    for _ in range(draws):
        cal = (rng.uniform(size=n), rng.uniform(size=n))
        d, c = rng.uniform(size=400), rng.uniform(size=400)
        d[:4], c[4:8] = 0.9995, 0.9995  # parts near the cutoffs, so the check below can fail
        term = FrameTerm(_Copod(c), 1.0, (0.5, 0.5), (0.5, 0.5), "minp", cal, peeled=True)
        fused, p = term.fuse_with_p(d, c)
        cut = min_rank_cutoffs(np.stack(cal), rate, delta)
        assert np.array_equal(fused > threshold, (d > cut[0]) | (c > cut[1]))
        assert np.all(p[fused > threshold] <= rate)  # a rejected part's p-value is at most alpha
        rates.append(1 - min(cut[0], 1.0) * min(cut[1], 1.0))
    share = float(np.mean(np.array(rates) > rate))
    exact = binom_sf(conditional_rank(n, rate, delta), n, 1 - rate)  # the same law as one detector's
    assert share <= delta and abs(share - exact) <= 4 * np.sqrt(exact * (1 - exact) / draws)
    # One detector: the peel p-value is the split-conformal one.
    cal1, s1 = rng.normal(size=(1, 50)), rng.normal(size=(1, 30))
    assert np.allclose(peel_p(cal1, s1), conformal_p(cal1[0], s1[0]))


def test_minp_breaks_ties_by_the_summed_scores():
    rng = np.random.default_rng(1)
    cal = (rng.normal(size=99), rng.normal(size=99))
    term = FrameTerm(_Copod([20.0, 40.0, 40.0]), 1.0, (0.0, 1.0), (0.0, 1.0), "minp", cal)
    fused = term.combine(np.array([30.0, 30.0, 50.0]), [None] * 3)
    assert fused[0] < fused[1] < fused[2]  # all beyond every good part: still ordered, never tied
    nan = term.combine(np.array([np.nan, 0.0, 0.0]), [None] * 3)
    assert np.isnan(nan[0]) and np.isfinite(nan[1:]).all()  # an unscorable part is an error, not a verdict


def test_calibrate_with_minp_stores_the_rule_and_scores_round_trip(trained_bundle, line_dir, tmp_path):
    import shutil

    from diffinspect.bundle import Bundle
    from diffinspect.data.image import read_image
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.scoring.loader import load_detector
    from diffinspect.scoring.threshold import min_rank_threshold

    path = tmp_path / "b"
    shutil.copytree(trained_bundle, path)
    with pytest.raises(DiffinspectError, match="--fusion"):
        calibrate(path, line_dir / "test" / "good", fusion="mean")
    calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, fusion="minp")
    manifest = Bundle.load(path).manifest
    cal = manifest.calibration
    assert manifest.score.fusion == "minp"  # kept: a later calibrate without --fusion uses it too
    from diffinspect.info import bundle_summary

    assert bundle_summary(path)["calibration"]["fusion"] == "minp"  # inspect info names the rule
    n = cal.n
    assert cal.frame_term.rule == "minp" and cal.threshold == pytest.approx(min_rank_threshold(n, 0.1))
    assert cal.frame_term.detector == "knn"  # the default embedding detector of the term
    det = load_detector(path, backend="torch")
    paths = sorted((line_dir / "test").glob("*/*.png"))
    frames = [read_image(p, det.preprocess.color) for p in paths]
    scores = det.score(frames).scores
    assert np.all(np.isfinite(scores))
    # The score is -log p plus a tie-break under one p level's gap: reject exactly when p <= alpha.
    p_level = np.ceil((n + 1) * np.exp(-scores) - 1e-6) / (n + 1)
    assert np.array_equal(scores > cal.threshold, p_level <= 0.1)
    assert p_level.min() >= 1 / (n + 1) and p_level.max() <= 1
    defect = np.array([p.parent.name != "good" for p in paths])
    assert roc_auc_score(defect, scores) > 0.8  # the fused rule still ranks the line's defects first
    # The calibration parts' own fused scores are each ranked among the others (as a new part would be).
    fused = det.frame_term.calibration
    assert len(fused[0]) == n and len(fused[1]) == n
