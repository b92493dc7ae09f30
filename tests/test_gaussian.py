"""The Gaussian frame term: Ledoit-Wolf covariance and Mahalanobis scores on classical embeddings."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from diffinspect import DiffinspectError
from diffinspect.bundle import Manifest
from diffinspect.models.recipe import Recipe
from diffinspect.scoring.copod import EcdfCopod
from diffinspect.scoring.gaussian import GaussianEmbedding, ledoit_wolf


def test_ledoit_wolf_and_mahalanobis_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 25)) @ rng.normal(size=(25, 25))  # fewer rows than twice the features
    z = (x - x.mean(0)) / x.std(0)
    cov, shrinkage = ledoit_wolf(z)
    ref = LedoitWolf(assume_centered=True).fit(z)
    assert shrinkage == pytest.approx(ref.shrinkage_) and 0 < shrinkage < 1
    np.testing.assert_allclose(cov, ref.covariance_, atol=1e-12)
    new = rng.normal(size=(6, 25))
    zn = (new - x.mean(0)) / x.std(0)
    expected = np.einsum("ij,jk,ik->i", zn, LedoitWolf().fit(z).precision_, zn)
    np.testing.assert_allclose(GaussianEmbedding(x).score(new), expected, rtol=1e-8)


def test_a_part_that_breaks_how_features_move_together_stands_out():
    rng = np.random.default_rng(1)
    a = rng.normal(size=500)
    good = np.c_[a, a + 0.1 * rng.normal(size=500), rng.normal(size=(500, 3))]  # features 0 and 1 move together
    typical = np.array([[1.5, 1.5, 0, 0, 0]])
    broken = np.array([[1.5, -1.5, 0, 0, 0]])  # each value common on its own, the pair never seen
    gauss, copod = GaussianEmbedding(good), EcdfCopod(good)
    assert gauss.score(broken)[0] > 20 * gauss.score(typical)[0]
    assert copod.score(broken)[0] < 2 * copod.score(typical)[0]  # per-feature tails cannot see it


def test_constant_features_and_bad_fit_sets():
    x = np.c_[np.random.default_rng(2).normal(size=(30, 3)), np.ones(30)]
    assert np.isfinite(GaussianEmbedding(x).score(x)).all()
    with pytest.raises(DiffinspectError, match="2 finite"):
        GaussianEmbedding(np.full((5, 3), np.nan))


def test_recipes_written_before_keep_copod_and_the_sum():
    old = Manifest.from_dict({"schema_version": 1, "diffinspect_version": "0.1.0", "files": {}, "score": {},
                              "preprocess": {"color": "gray", "image_size": 64}}, Path("."))
    assert (old.score.frame_detector, old.score.fusion) == ("copod", "sum")
    assert (Recipe().frame_detector, Recipe().fusion) == ("gaussian", "minp")
