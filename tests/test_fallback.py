"""The COPOD fallback and its classical embeddings, on synthetic noise-texture frames."""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffinspect import DiffinspectError
from diffinspect.data.image import Preprocess
from diffinspect.scoring.copod import CopodDetector, EcdfCopod, fit_copod
from diffinspect.scoring.features import classical_embedding, embed_frames, embedding_dim

ALPHA = 0.1


def good_frame(rng: np.random.Generator, size: tuple[int, int] = (96, 96), channels: int = 1) -> np.ndarray:
    """A good part: smooth random texture with sensor noise and a small brightness change per frame."""
    h, w = size
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), rng.uniform(1.2, 1.6))
    img = 120 + rng.uniform(-8, 8) + 18 * noise / (noise.std() + 1e-6) + rng.normal(0, 3, (h, w))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 3:
        return np.ascontiguousarray(np.clip(img[:, :, None] * [1.0, 0.9, 0.8], 0, 255).astype(np.uint8))
    return img[:, :, None]


def defect_frame(rng: np.random.Generator, kind: str, size: tuple[int, int] = (96, 96),
                 channels: int = 1) -> np.ndarray:
    """A good part with a small bright blob or a thin dark scratch."""
    img = good_frame(rng, size, channels).copy()
    h, w = size
    if kind == "blob":
        centre = (int(rng.uniform(0.2, 0.8) * w), int(rng.uniform(0.2, 0.8) * h))
        cv2.circle(img, centre, int(rng.uniform(0.03, 0.06) * min(h, w)) + 1, (230,) * channels, -1)
    else:
        p1 = (int(rng.uniform(0.1, 0.5) * w), int(rng.uniform(0.1, 0.9) * h))
        p2 = (p1[0] + int(rng.uniform(0.2, 0.4) * w), p1[1] + int(rng.uniform(-0.3, 0.3) * h))
        cv2.line(img, p1, p2, (40,) * channels, 1)
    return img


@pytest.fixture(scope="module")
def fitted() -> CopodDetector:
    rng = np.random.default_rng(0)
    return fit_copod([good_frame(rng) for _ in range(200)], Preprocess(), ALPHA)


@pytest.fixture(scope="module")
def fresh_good() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [good_frame(rng) for _ in range(300)]


# --- embeddings ---------------------------------------------------------------------------------------

def test_embedding_is_fixed_length_deterministic_float32_for_any_frame() -> None:
    rng = np.random.default_rng(2)
    shapes = [(128, 128, 1), (128, 128, 3), (64, 64, 1), (50, 300, 3), (480, 640, 3), (40, 40)]
    for shape in shapes:
        frame = rng.integers(0, 256, shape, dtype=np.uint8)
        emb = classical_embedding(frame)
        assert emb.dtype == np.float32 and emb.shape == (embedding_dim(),)
        assert np.isfinite(emb).all()
        assert np.array_equal(emb, classical_embedding(frame.copy()))
    assert embedding_dim() == 3 * embedding_dim(1) and embedding_dim(1) <= 400
    assert embed_frames([]).shape == (0, embedding_dim())


def test_the_embedding_holds_the_feature_size_its_half_and_its_quarter_and_version_1_is_still_made() -> None:
    frame = good_frame(np.random.default_rng(5), (300, 200), 3)
    v1 = classical_embedding(frame, version=1)
    v2 = classical_embedding(frame)
    square = cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA)
    d = embedding_dim(1)
    assert np.array_equal(v2[:d], v1)  # the feature size itself, as version 1 embeds it
    for i, side in ((1, 64), (2, 32)):  # then the smaller squares, made from that 128 px copy
        small = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
        assert np.array_equal(v2[i * d:(i + 1) * d], classical_embedding(small, size=side, version=1))
    with pytest.raises(DiffinspectError, match="v9"):
        classical_embedding(frame, version=9)


def test_a_fallback_fitted_on_version_1_embeddings_embeds_new_frames_the_same_way(tmp_path) -> None:
    rng = np.random.default_rng(6)
    frames = [good_frame(rng) for _ in range(30)]
    old = CopodDetector(embed_frames(frames, version=1), 1.0, Preprocess(color="gray", image_size=64),
                        feature_version=1)
    record = old.save(tmp_path)
    assert record.feature_version == 1 and record.embedding_dim == embedding_dim(1)
    loaded = CopodDetector.load(tmp_path / record.file, record, old.preprocess)
    assert loaded.embed(frames[:2]).shape == (2, embedding_dim(1))
    assert np.array_equal(loaded.score(frames[:5]).scores, old.score(frames[:5]).scores)


def test_gray_as_three_equal_channels_embeds_like_gray() -> None:
    # The same picture as 1 or 3 equal channels: same luma features, chroma features at zero.
    gray = good_frame(np.random.default_rng(3))
    as_rgb = np.repeat(gray, 3, axis=2)
    assert np.array_equal(classical_embedding(as_rgb), classical_embedding(gray))


def test_embedding_rejects_bad_frames() -> None:
    with pytest.raises(DiffinspectError):
        classical_embedding(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(DiffinspectError):
        classical_embedding(np.zeros((32, 32, 4), dtype=np.uint8))


# --- detection and calibration ------------------------------------------------------------------------

def test_defects_score_above_good_frames(fitted: CopodDetector, fresh_good: list[np.ndarray]) -> None:
    rng = np.random.default_rng(4)
    defects = [defect_frame(rng, kind) for kind in ("blob", "scratch") for _ in range(40)]
    good = fitted.score(fresh_good[:150]).scores
    bad = fitted.score(defects).scores
    auroc = roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
    print(f"AUROC {auroc:.3f}")
    assert auroc > 0.9, auroc


def test_conformal_threshold_bounds_false_rejects(fitted: CopodDetector,
                                                  fresh_good: list[np.ndarray]) -> None:
    n_cal = fitted.n_calibration
    assert n_cal == 100 and fitted.embeddings.shape[0] == 100
    # The threshold is the ceil((n+1)(1-alpha))-th smallest calibration score.
    rank = math.ceil((n_cal + 1) * (1 - ALPHA))
    assert fitted.threshold == np.sort(fitted.calibration_scores)[rank - 1]
    frr = float((fitted.score(fresh_good).scores > fitted.threshold).mean())
    # Spread of the realized rate: the calibration draw (Beta, var ~ a(1-a)/(n+2)) plus the fresh sample.
    sigma = math.sqrt(ALPHA * (1 - ALPHA) * (1 / (n_cal + 2) + 1 / len(fresh_good)))
    print(f"FRR {frr:.3f} (alpha {ALPHA}, bound {ALPHA + 3 * sigma:.3f})")
    assert frr <= ALPHA + 3 * sigma, frr


def test_too_few_frames_names_the_needed_count() -> None:
    rng = np.random.default_rng(5)
    frames = [good_frame(rng, (40, 40)) for _ in range(50)]
    with pytest.raises(DiffinspectError, match="need at least 119"):
        fit_copod(frames, Preprocess(), 0.01)  # 99 to calibrate + 20 to fit


# --- scoring contract ---------------------------------------------------------------------------------

def test_single_frame_scores_equal_batch_scores(fitted: CopodDetector, fresh_good: list[np.ndarray]) -> None:
    rng = np.random.default_rng(6)
    frames = fresh_good[:10] + [defect_frame(rng, "blob") for _ in range(5)]
    batch = fitted.score(frames)
    assert batch.maps is None and batch.scores.shape == (15,)
    single = np.array([fitted.score([f]).scores[0] for f in frames])
    np.testing.assert_allclose(single, batch.scores, rtol=1e-12, atol=0)
    assert fitted.score([]).scores.shape == (0,)


def test_scores_match_pyod_copod_for_a_batch_of_one(monkeypatch, tmp_path) -> None:
    # pyod rescores the fit set together with the batch; for one new point its ECDF is ours exactly,
    # and only the skewness may differ (pyod includes the new point). Heavily skewed features keep the
    # sign, so the scores must agree.
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path))  # pyod imports matplotlib, which caches under $HOME
    copod = pytest.importorskip("pyod.models.copod")
    rng = np.random.default_rng(7)
    fit = rng.lognormal(0.0, 1.0, (80, 12)).astype(np.float32)
    new = rng.lognormal(0.0, 1.2, (6, 12)).astype(np.float32)
    ours = EcdfCopod(fit)
    ref = copod.COPOD().fit(ours._standardize(fit))
    expected = [ref.decision_function(ours._standardize(new[i:i + 1]))[0] for i in range(len(new))]
    np.testing.assert_allclose(ours.score(new), expected, rtol=1e-10)


def test_save_load_round_trip_gives_identical_scores(fitted: CopodDetector, fresh_good: list[np.ndarray],
                                                     tmp_path) -> None:
    record = fitted.save(tmp_path / "bundle")
    assert isinstance(record.threshold, float) and record.threshold == fitted.threshold  # a number, not text
    assert record.file == "embeddings.npy" and record.n_calibration == 100
    path = tmp_path / "bundle" / "embeddings.npy"
    assert path.is_file()
    # The bundle hands out the verified file itself.
    loaded = CopodDetector.load(path, record, fitted.preprocess)
    assert loaded.threshold == fitted.threshold and loaded.false_reject_rate == ALPHA
    frames = fresh_good[:20]
    assert np.array_equal(loaded.score(frames).scores, fitted.score(frames).scores)
    with pytest.raises(DiffinspectError, match="feature recipe"):
        CopodDetector.load(path, replace(record, feature_version=0), fitted.preprocess)
    with pytest.raises(DiffinspectError, match="embeddings"):
        CopodDetector.load(tmp_path / "missing" / "embeddings.npy", record, fitted.preprocess)


@pytest.mark.parametrize(("channels", "color"), [(3, "rgb"), (1, "gray")])
def test_gray_rgb_and_varying_frame_sizes(channels: int, color: str) -> None:
    """Fitted on frames of three sizes, the fallback separates blobs on each of them, keeps its
    false-reject rate on good ones, and still gives a finite score to a frame of a size it never saw."""
    rng = np.random.default_rng(8)
    sizes = [(80, 120), (96, 96), (150, 100)]
    det = fit_copod([good_frame(rng, sizes[i % 3], channels) for i in range(60)], Preprocess(color=color), 0.2)
    good = det.score([good_frame(rng, sizes[i % 3], channels) for i in range(30)]).scores
    bad = det.score([defect_frame(rng, "blob", sizes[i % 3], channels) for i in range(30)]).scores
    assert roc_auc_score(np.r_[np.zeros(30), np.ones(30)], np.r_[good, bad]) > 0.7
    assert (good > det.threshold).mean() <= 0.3
    unseen = det.score([good_frame(rng, (64, 200), channels), good_frame(rng, (300, 300), channels)]).scores
    assert np.isfinite(unseen).all()
    assert det.embed([good_frame(rng, (70, 90), channels)]).shape == (1, embedding_dim())


def test_frames_are_cropped_to_the_roi_before_embedding() -> None:
    rng = np.random.default_rng(9)
    roi = Preprocess(roi=(0, 0, 64, 64))
    det = fit_copod([good_frame(rng, (96, 96)) for _ in range(40)], roi, 0.2)
    clean = good_frame(rng, (96, 96))
    marked = clean.copy()
    marked[80:90, 80:90] = 255  # outside the ROI: must not change the score
    assert np.array_equal(det.score([marked]).scores, det.score([clean]).scores)
