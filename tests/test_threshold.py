"""The threshold rules' guarantees, over many calibration draws (numpy only, fast).

Scores of good parts are uniform on [0, 1], so a threshold t's true false-reject rate is 1 - t exactly
(for two independent detectors with cutoffs c: 1 - c1 * c2)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.scoring.threshold import (
    binom_sf,
    check_calibration_size,
    conditional_rank,
    conditional_threshold,
    conformal_threshold,
    describe_bound,
    level_threshold,
    min_calibration_size,
    min_rank_cutoffs,
    peel_blocks,
)

DRAWS = 2000
ALPHA, DELTA = 0.01, 0.05


def _share_above(rates: np.ndarray, exact: float) -> None:
    """The share of draws whose rate exceeds alpha is the exact binomial probability (within 4 sigma)."""
    share = float(np.mean(rates > ALPHA))
    assert share <= DELTA + 4 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)
    assert abs(share - exact) <= 4 * math.sqrt(exact * (1 - exact) / DRAWS) + 1e-9


def test_sizes_and_ranks():
    assert min_calibration_size(ALPHA) == 99
    assert min_calibration_size(ALPHA, DELTA) == 299  # (0.99)^299 <= 0.05 < (0.99)^298
    assert conditional_rank(299, ALPHA, DELTA) == 299
    for n in (299, 500, 2000):
        k = conditional_rank(n, ALPHA, DELTA)
        assert binom_sf(k, n, 1 - ALPHA) <= DELTA < binom_sf(k - 1, n, 1 - ALPHA)  # the smallest such k
        assert k >= math.ceil((n + 1) * (1 - ALPHA))  # never a lower rank than the marginal rule's
    with pytest.raises(DiffinspectError, match="with 0.95 confidence: need at least 299 good images"):
        conditional_threshold(np.zeros(298), ALPHA)
    with pytest.raises(DiffinspectError, match="confidence"):
        check_calibration_size(1000, ALPHA, delta=1.5)


def test_marginal_rule_holds_on_average_but_not_per_calibration_set():
    rng = np.random.default_rng(0)
    n = 99
    rates = np.array([1 - conformal_threshold(rng.uniform(size=n), ALPHA) for _ in range(DRAWS)])
    assert np.mean(rates) <= ALPHA + 4 * np.std(rates) / math.sqrt(DRAWS)
    # Here the threshold is the largest score: its rate exceeds alpha when all 99 are below 0.99.
    share = float(np.mean(rates > ALPHA))
    assert abs(share - 0.99 ** 99) < 4 * math.sqrt(0.4 * 0.6 / DRAWS) and share > DELTA


def test_conditional_rule_holds_for_all_but_delta_of_calibration_sets():
    rng = np.random.default_rng(1)
    for n in (299, 600):
        rates = np.array([1 - conditional_threshold(rng.uniform(size=n), ALPHA, DELTA) for _ in range(DRAWS)])
        _share_above(rates, binom_sf(conditional_rank(n, ALPHA, DELTA), n, 1 - ALPHA))
        assert np.mean(rates) <= ALPHA


def test_best_rank_cutoffs_hold_conditionally_with_any_number_of_detectors():
    rng = np.random.default_rng(2)
    n = 400
    exact = binom_sf(conditional_rank(n, ALPHA, DELTA), n, 1 - ALPHA)
    for k in (2, 3):
        rates = []
        for _ in range(DRAWS):
            cut = min_rank_cutoffs(rng.uniform(size=(k, n)), ALPHA, DELTA)
            rates.append(1 - np.prod(np.minimum(cut, 1.0)))
        rates = np.array(rates)
        _share_above(rates, exact)  # the same Beta law as one detector's order statistic
    # One detector: the peel is the conditional order statistic itself.
    s = rng.uniform(size=(1, n))
    assert min_rank_cutoffs(s, ALPHA, DELTA)[0] == conditional_threshold(s[0], ALPHA, DELTA)
    # Each detector can reject on its own: the peeled parts are above a cutoff, the last peel of each
    # detector sits on it, and no other part is above any.
    cal = rng.normal(size=(2, 1000))
    cut = min_rank_cutoffs(cal, ALPHA, DELTA)
    blocks = 1001 - conditional_rank(1000, ALPHA, DELTA)
    assert np.isfinite(cut).all() and (cal > cut[:, None]).any(0).sum() == blocks - 2
    with pytest.raises(DiffinspectError, match="not finite"):
        min_rank_cutoffs(np.where(np.arange(1000) == 3, np.nan, cal), ALPHA, DELTA)


def test_describe_bound_names_the_rule_and_the_guarantee():
    split = describe_bound(120, 0.01)
    assert "120 good images" in split and "split-conformal" in split
    assert "on average over calibration sets, at most 0.01 of good parts are rejected" in split
    fused = describe_bound(120, 0.01, "best-rank")
    assert "full-conformal best-rank" in fused and "split" not in fused
    cond = describe_bound(400, 0.01, "best-rank", delta=0.05)
    assert "calibration-conditional best-rank" in cond and "full-conformal" not in cond
    assert "order statistic" in describe_bound(400, 0.01, delta=0.05)
    assert "with 95% confidence, at most 0.01 of good parts are rejected by this threshold" in cond


def test_calibrate_uses_the_conditional_threshold_when_it_can_and_says_why_when_not(trained_bundle, line_dir,
                                                                                     tmp_path):
    """Enough images: the conditional threshold (one score, or the peeled best-rank rule), recorded and
    stated; too few images: the average bound, with the reason and the n needed."""
    import shutil

    from diffinspect.bundle import Bundle
    from diffinspect.data.datasets import labelled_set
    from diffinspect.data.image import read_image
    from diffinspect.info import bundle_summary
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.scoring.inspector import Inspector

    good = line_dir / "test" / "good"  # 24 images: enough at 20 % for 90 % confidence (11 needed)
    split = tmp_path / "split"
    shutil.copytree(trained_bundle, split)
    result = calibrate(split, good, false_reject_rate=0.2, fusion="sum", confidence=0.9)
    cal = Bundle.load(split).manifest.calibration
    assert result.delta == pytest.approx(0.1) and cal.confidence == pytest.approx(0.9)
    assert cal.rule == "calibration-conditional order statistic"
    assert "with 90% confidence" in result.bound and "with 90% confidence" in bundle_summary(split)["calibration"][
        "guarantee"]
    marginal = calibrate(split, good, false_reject_rate=0.2, fusion="sum", confidence=None)
    assert result.threshold >= marginal.threshold  # the conditional one is the more careful
    few = calibrate(split, good, false_reject_rate=0.1, fusion="sum", confidence=0.95)
    assert few.delta is None and "needs at least 29 good images, here 24" in few.bound
    # The fused best-rank rule from the command line: the peeled form, its threshold at the peel's level.
    res = subprocess.run([sys.executable, "-m", "diffinspect", "calibrate", str(split), str(good), "--fusion", "minp",
                          "--false-reject-rate", "0.2", "--confidence", "0.9", "--backend", "torch"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 0, res.stderr
    said = res.stdout + res.stderr
    assert "with 90% confidence" in said and "calibration-conditional best-rank" in said
    cal = Bundle.load(split).manifest.calibration
    assert cal.rule == "calibration-conditional best-rank (peeled blocks)" and cal.confidence == pytest.approx(0.9)
    blocks = peel_blocks(cal.n, 0.2, 0.1)
    assert cal.threshold == pytest.approx(level_threshold(cal.n, blocks))
    inspector = Inspector.load(split, backend="torch")
    frames = [read_image(s.path, inspector.preprocess.color) for s in labelled_set(line_dir).samples]
    verdicts = inspector.inspect(frames)
    assert {v.label for v in verdicts} == {"ok", "ng"}
    assert all((v.label == "ng") == (v.p_value <= blocks / (cal.n + 1) + 1e-12) for v in verdicts)
    few = calibrate(split, good, false_reject_rate=0.1, fusion="minp", confidence=0.95)
    assert few.delta is None and "needs at least 29 good images, here 24" in few.bound and "on average" in few.bound
    assert Bundle.load(split).manifest.calibration.rule == "full-conformal best-rank"
