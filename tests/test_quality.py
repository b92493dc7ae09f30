"""Tests that guard the value: each detector's own quality on the synthetic line, at a bar near what it
reaches there, so a broken detector (zeroed weights, too little training, a wrong fit) fails its own test
instead of hiding behind the fused score; the distilled student against its teacher; and the false-reject
rate on good frames nothing was fitted or calibrated on."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.data.synthetic import render_frame
from diffinspect.scoring.calibrate import calibrate
from diffinspect.scoring.inspector import Inspector
from diffinspect.scoring.loader import load_detector, load_fallback


def _labelled(line_dir: Path, color: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The synthetic line's test frames (good ones and every defect type) and their labels."""
    samples = labelled_set(line_dir).samples
    return [read_image(s.path, color) for s in samples], np.array([s.is_anomalous for s in samples])


def _diffusion_alone(det, frames: list[np.ndarray]) -> np.ndarray:
    """The diffusion detector's score with the frame-level embedding term off (it would carry the fused
    score by itself on this line)."""
    term, det.frame_term = det.frame_term, None
    try:
        return det.score(frames).scores
    finally:
        det.frame_term = term


def test_the_diffusion_score_alone_finds_the_defects_and_fails_without_its_model(calibrated_bundle, line_dir):
    """High on the synthetic line, and near chance once the denoiser is zeroed."""
    import torch

    det = load_detector(calibrated_bundle, backend="torch")
    frames, labels = _labelled(line_dir, det.preprocess.color)
    assert roc_auc_score(labels, _diffusion_alone(det, frames)) > 0.95
    with torch.no_grad():
        for param in det.engine.graph.denoiser.parameters():
            param.zero_()
    assert roc_auc_score(labels, _diffusion_alone(det, frames)) < 0.7


def test_the_frame_term_alone_finds_the_defects(calibrated_bundle, line_dir):
    """The frame-level term (the nearest good parts' classical embeddings, the default frame detector) by
    itself: it separates every defect of this line."""
    det = load_detector(calibrated_bundle, backend="torch")
    assert det.frame_term is not None and det.frame_term.detector == "knn"
    frames, labels = _labelled(line_dir, det.preprocess.color)
    assert roc_auc_score(labels, det.frame_term.embedding_scores(frames)) > 0.97


def test_the_copod_fallback_alone_finds_the_defects(calibrated_bundle, line_dir):
    """The fallback the line runs on when the model or the accelerator fails: COPOD on the same
    embeddings, a little weaker than the frame term."""
    det = load_fallback(calibrated_bundle)
    assert det.name == "copod"
    frames, labels = _labelled(line_dir, det.preprocess.color)
    assert roc_auc_score(labels, det.score(frames).scores) > 0.93


STUDENT_MARGIN = 0.05  # image AUROC the one-step student may lose against its teacher


def test_the_student_keeps_the_teachers_auroc(calibrated_bundle, distilled_bundle, line_dir):
    """Distillation trades steps for speed, not for detection: the student's own diffusion score (after
    distillation re-calibrated the bundle for it) stays within STUDENT_MARGIN of the teacher's."""
    teacher = load_detector(calibrated_bundle, backend="torch")
    frames, labels = _labelled(line_dir, teacher.preprocess.color)
    teacher_auroc = roc_auc_score(labels, _diffusion_alone(teacher, frames))
    student = load_detector(distilled_bundle[0], backend="torch")
    assert len(student.engine.graph.path) == 1  # the one-step student scores
    student_auroc = roc_auc_score(labels, _diffusion_alone(student, frames))
    assert student_auroc >= teacher_auroc - STUDENT_MARGIN, (student_auroc, teacher_auroc)


def _write_good_frames(folder: Path, n: int, rng: np.random.Generator) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        img, _ = render_frame("metal", rng, 64)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def test_false_rejects_on_fresh_good_frames_stay_near_the_target(trained_bundle, tmp_path):
    """End to end, as a line runs: calibrate at alpha on good frames, then inspect good frames that neither
    training nor calibration saw. The share rejected follows the marginal bound's law: the threshold rejects
    p <= m / (n + 1), m = floor(alpha (n + 1)), so for one calibration set the rate is Beta(m, n + 1 - m)
    and the count among new frames beta-binomial; the test allows its mean +- 3 standard deviations."""
    alpha, n_cal, n_new = 0.1, 200, 400
    rng = np.random.default_rng(21)  # frames that neither the training set nor the line fixture drew
    cal_dir = _write_good_frames(tmp_path / "good", n_cal, rng)
    new_dir = _write_good_frames(tmp_path / "new", n_new, rng)
    path = tmp_path / "b"
    shutil.copytree(trained_bundle, path)
    calibrate(path, cal_dir, false_reject_rate=alpha, backend="torch", confidence=None)
    inspector = Inspector.load(path, backend="torch")
    frames = [read_image(p, inspector.preprocess.color) for p in sorted(new_dir.iterdir())]
    rejected = np.mean([v.label == "ng" for v in inspector.inspect(frames)])

    m = math.floor(alpha * (n_cal + 1) + 1e-9)
    a, b = m, n_cal + 1 - m
    mean = a / (a + b)
    sd = math.sqrt(mean * (1 - mean) / n_new * (a + b + n_new) / (a + b + 1))
    assert mean - 3 * sd <= rejected <= mean + 3 * sd, (rejected, mean, sd)


@pytest.mark.parametrize(("fusion", "confidence", "rule"), [
    ("minp", None, "full-conformal best-rank"),  # the fused p-value's rule, not split-conformal
    ("sum", 0.95, "calibration-conditional order statistic"),
])
def test_every_reader_names_the_rule_that_set_the_threshold(trained_bundle, line_dir, tmp_path, fusion, confidence,
                                                            rule):
    """The rule is named once, at calibration (the manifest); the calibrate command's sentence, inspect info
    and the evaluation report say the same rule."""
    from diffinspect.bundle import Bundle
    from diffinspect.evaluation.evaluate import evaluate
    from diffinspect.scoring.threshold import guarantee

    cal_dir = _write_good_frames(tmp_path / "good", 40, np.random.default_rng(5))  # enough for the 95 % bound
    path = tmp_path / "b"
    shutil.copytree(trained_bundle, path)
    result = calibrate(path, cal_dir, false_reject_rate=0.1, backend="torch", fusion=fusion, confidence=confidence)
    cal = Bundle.load(path).manifest.calibration
    named = f"({rule} rule)"
    assert cal.rule == rule and named in result.bound and named in guarantee(cal)
    report = evaluate([path], [line_dir], tmp_path / "report", baselines=(), backend="torch")
    rows = [row for figures in report["datasets"].values() for name, row in figures.items() if name == "diffinspect"]
    assert rows and all(named in row["calibration"] for row in rows), rows
