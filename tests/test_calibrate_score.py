import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.scoring.calibrate import calibrate
from diffinspect.scoring.inspector import Inspector
from diffinspect.scoring.loader import load_detector
from diffinspect.scoring.score import score_paths
from diffinspect.scoring.threshold import conformal_threshold, min_calibration_size


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "diffinspect", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_conformal_rule():
    scores = np.arange(1, 101, dtype=float)  # n = 100
    assert conformal_threshold(scores, 0.1) == 91.0  # ceil(101 * 0.9) = 91st smallest
    assert min_calibration_size(0.01) == 99
    with pytest.raises(DiffinspectError, match="at least 99"):
        conformal_threshold(scores[:50], 0.01)


def test_conformal_false_reject_rate_holds_on_fresh_good_scores():
    rng = np.random.default_rng(0)
    alpha, rates = 0.1, []
    for _ in range(200):
        thr = conformal_threshold(rng.gamma(2.0, size=50), alpha)
        rates.append(np.mean(rng.gamma(2.0, size=2000) > thr))
    # The bound is on the average over calibration draws: alpha - 1/(n+1) <= E[rate] <= alpha.
    assert alpha - 1 / 51 - 0.01 <= np.mean(rates) <= alpha + 0.01


def test_defects_score_above_good_and_maps_mark_them(calibrated_bundle, line_dir):
    det = load_detector(calibrated_bundle, backend="torch")
    test = labelled_set(line_dir)
    frames = [read_image(s.path, det.preprocess.color) for s in test.samples]
    result = det.score(frames)
    labels = np.array([s.is_anomalous for s in test.samples])
    assert roc_auc_score(labels, result.scores) > 0.8
    # The map is hotter inside the defect than outside, for most defect images.
    hotter = []
    for s, amap in zip(test.samples, result.maps, strict=True):
        if s.mask is None:
            continue
        mask = cv2.resize(cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE), amap.shape[::-1],
                          interpolation=cv2.INTER_AREA) > 64
        if mask.any():
            hotter.append(amap[mask].mean() > amap[~mask].mean())
    assert np.mean(hotter) > 0.7


def test_calibration_is_recorded(calibrated_bundle):
    b = Bundle.load(calibrated_bundle)
    cal = b.manifest.calibration
    assert cal.n == 24 and cal.false_reject_rate == 0.1 and cal.rule == "full-conformal best-rank"
    assert {"calibration.npz", "embeddings.npy"} <= set(b.manifest.files)
    assert b.manifest.fallback.threshold


def test_too_few_images_for_the_rate_is_refused(trained_bundle, line_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(trained_bundle, copy)
    with pytest.raises(DiffinspectError, match="need at least 99"):
        calibrate(copy, line_dir / "test" / "good", false_reject_rate=0.01)


def test_uncalibrated_bundle_says_what_to_do(trained_bundle):
    with pytest.raises(DiffinspectError, match="inspect calibrate"):
        load_detector(trained_bundle)


def test_score_cli_json_with_a_corrupt_file(calibrated_bundle, line_dir, tmp_path):
    imgs = tmp_path / "imgs"
    shutil.copytree(line_dir / "test" / "scratch", imgs)
    (imgs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = cli("score", calibrated_bundle, imgs, "--json", "--overlay-dir", tmp_path / "ov", "--backend", "torch")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(records) == len(list(imgs.iterdir()))
    bad = [r for r in records if r["path"].endswith("corrupt.png")]
    assert bad[0]["label"] == "error" and bad[0]["error"] and bad[0]["score"] is None
    good = [r for r in records if r["label"] != "error"]
    assert good and all(r["overlay"] and (tmp_path / "ov").joinpath(r["overlay"]).exists() for r in good)
    assert set(good[0]) >= {"path", "score", "threshold", "label", "detector", "backend", "latency_ms"}


def test_score_cli_nothing_scorable_exits_non_zero(calibrated_bundle, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    res = cli("score", calibrated_bundle, tmp_path / "bad.png", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"] == "empty file (0 bytes)"


def test_cli_errors_are_one_line(tmp_path):
    res = cli("score", tmp_path / "nope", tmp_path)
    assert res.returncode == 2
    assert "bundle not found" in res.stderr and "Traceback" not in res.stderr


def test_inspector_of_a_calibrated_bundle(calibrated_bundle, line_dir):
    inspector = Inspector.load(calibrated_bundle, backend="torch")
    b = Bundle.load(calibrated_bundle)
    with np.load(b.file("calibration.npz")) as z:
        np.testing.assert_array_equal(inspector.calibration_scores, np.sort(z["scores"]))
    samples = labelled_set(line_dir).samples
    frames = [read_image(s.path, inspector.preprocess.color) for s in samples]
    verdicts = inspector.inspect(frames)
    rate = b.manifest.calibration.false_reject_rate
    assert {v.label for v in verdicts} == {"ok", "ng"}
    assert all((v.label == "ng") == (v.p_value <= rate) for v in verdicts)  # the threshold is the p-value's rule
    assert all(v.map.shape == f.shape[:2] for v, f in zip(verdicts, frames, strict=True))


def test_overlays_mark_the_defect(calibrated_bundle, line_dir, tmp_path):
    inspector = Inspector.load(calibrated_bundle, backend="torch")
    paths = sorted((line_dir / "test" / "spot").iterdir())
    recs = list(score_paths(inspector, paths, tmp_path, overlays="all"))
    img = cv2.imread(recs[0].overlay)
    assert img is not None and img.shape[0] >= 256


@pytest.mark.slow
def test_copod_only_bundle_from_good_images(line_dir, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for i, p in enumerate(sorted((line_dir / "train" / "good").iterdir()) * 2):  # 120 frames
        img = cv2.imread(str(p))
        cv2.imwrite(str(good / f"{i:03d}.png"), np.roll(img, i % 7, axis=1))
    res = cli("calibrate", "--detector", "copod", good, "--out", tmp_path / "cb", "--false-reject-rate", "0.05")
    assert res.returncode == 0, res.stderr
    det = load_detector(tmp_path / "cb")
    assert det.name == "copod"
    test = labelled_set(line_dir)
    scores = det.score([read_image(s.path, det.preprocess.color) for s in test.samples]).scores
    assert roc_auc_score([s.is_anomalous for s in test.samples], scores) > 0.6


def test_tune_picks_a_recipe_on_synthetic_defects_then_calibrates(calibrated_bundle, line_dir, tmp_path):
    from diffinspect.train.tune import tune

    copy = tmp_path / "b"
    shutil.copytree(calibrated_bundle, copy)
    best = tune(copy)
    b = Bundle.load(copy)
    assert b.manifest.score == best["recipe"]
    assert b.manifest.calibration is None  # statistics of the old recipe no longer apply
    assert best["auroc"] == max(r["auroc"] for r in b.manifest.tuning["table"])
    assert best["auroc"] > 0.6
    calibrate(copy, line_dir / "test" / "good", false_reject_rate=0.1)
    assert load_detector(copy, backend="torch").score([np.zeros((40, 40, 3), np.uint8)]).scores.shape == (1,)
