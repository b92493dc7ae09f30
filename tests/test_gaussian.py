"""The Gaussian frame term: Ledoit-Wolf covariance and Mahalanobis scores on classical embeddings."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Manifest
from diffinspect.models.recipe import Recipe
from diffinspect.scoring.copod import EcdfCopod
from diffinspect.scoring.gaussian import GaussianEmbedding, NearestEmbedding, ledoit_wolf


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
    assert (Recipe().frame_detector, Recipe().fusion) == ("knn", "minp")


def test_the_nearest_good_parts_see_a_part_between_two_looks_that_one_gaussian_takes_in():
    rng = np.random.default_rng(3)
    looks = rng.normal(size=(800, 2))
    looks[:, 0] = np.r_[rng.normal(-3, 0.2, 400), rng.normal(3, 0.2, 400)]  # two lightings, say
    between = np.zeros((1, 2))  # at the mean of all good parts, and far from each of them
    gauss, near = GaussianEmbedding(looks), NearestEmbedding(looks)
    good_gauss, good_near = gauss.score(looks), near.score(looks)
    assert gauss.score(between)[0] < np.median(good_gauss)  # the Gaussian calls it typical
    assert near.score(between)[0] > np.quantile(good_near, 0.99)  # further from good parts than they are


def test_the_fit_set_scores_itself_as_unseen_parts_and_excluded_parts_are_not_neighbours():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 6))
    near = NearestEmbedding(x, neighbours=1)
    w = near.memory
    d = np.sqrt(((w[:, None] - w[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(near.score(x), d.min(1), rtol=1e-6)  # each one's nearest other part
    first = d[0].argmin()
    exclude = np.zeros((1, 50), bool)
    exclude[0, first] = True
    assert near.score(x[:1], exclude)[0] == pytest.approx(np.sort(d[0])[1], rel=1e-6)
    assert np.isnan(near.score(np.full((1, 6), np.nan)))[0]
    five = NearestEmbedding(x)  # the default: the mean distance to the 5 nearest others
    np.testing.assert_allclose(five.score(x), np.sort(d, 1)[:, :5].mean(1), rtol=1e-6)
    assert NearestEmbedding(x[:3]).neighbours == 2  # a tiny fit set: every other part


def test_calibrate_with_the_nearest_good_parts_records_it_and_scores_defects_above_good(calibrated_bundle,
                                                                                          line_dir, tmp_path):
    import shutil

    from diffinspect.data.datasets import labelled_set
    from diffinspect.data.image import read_image
    from diffinspect.evaluation.metrics import image_auroc
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.scoring.loader import load_detector

    bundle = tmp_path / "knn"
    shutil.copytree(calibrated_bundle, bundle)
    calibrate(bundle, line_dir / "test" / "good", false_reject_rate=0.1, frame_detector="knn")
    assert Bundle.load(bundle).manifest.score.frame_detector == "knn"
    det = load_detector(bundle, backend="torch")
    assert det.frame_term.detector == "knn"
    samples = labelled_set(line_dir).samples
    frames = [read_image(s.path, det.preprocess.color) for s in samples]
    labels = np.array([s.is_anomalous for s in samples])
    knn = det.frame_term.embedding_scores(frames)
    assert np.isfinite(det.score(frames).scores).all()
    assert image_auroc(labels, knn) > 0.95  # the term alone, on the embeddings of the synthetic line
