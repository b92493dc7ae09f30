"""Distillation: the student learns the teacher's rebuild, is chosen on synthetic defects, and the bundle
keeps scoring and calibrating with either sampler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Calibration, Export, Manifest
from diffinspect.data.image import Preprocess, read_image
from diffinspect.models.recipe import Recipe
from diffinspect.scoring.calibrate import calibrate
from diffinspect.scoring.loader import load_detector
from diffinspect.train.distill import calibration_folder, checkpoint_dir, distill

QUIET = {"device": "cpu", "batch_size": 8}


@pytest.fixture(autouse=True)
def small_selection_set(monkeypatch):
    """Fewer images behind each checkpoint evaluation: the tests check the mechanics, not the AUROC."""
    from diffinspect.train import selection

    monkeypatch.setattr(selection, "MAX_GOOD", 8)
    monkeypatch.setattr(selection, "STATS_IMAGES", 8)


def copy_of(bundle, tmp_path, name="b"):
    dst = tmp_path / name
    shutil.copytree(bundle, dst)
    return dst


def test_student_approaches_teacher(distilled_bundle, calibrated_bundle):
    b, result = distilled_bundle  # distill(steps=1, iterations=40) of a copy of calibrated_bundle
    teacher_sha = Bundle.load(calibrated_bundle).manifest.files["weights.pt"]
    history = result["selection"]["history"]
    # Iteration 0 is the undistilled one-step x̂0 prediction of the same weights.
    assert history[0]["iteration"] == 0 and history[-1]["iteration"] == 40
    assert history[-1]["teacher_mse"] < 0.5 * history[0]["teacher_mse"], history
    assert all(0.0 <= h["auroc"] <= 1.0 for h in history)
    assert len(history) == 5  # start, 1/4, 2/4, 3/4, end

    m = Bundle.load(b).manifest  # verifies every sha256, student.pt included
    student = m.sampler.student
    assert m.sampler.default == "student"
    assert (student.weights, student.steps, student.teacher_steps, student.iterations) == (
        "student.pt", 1, 10, 40)
    assert student.selection["chosen_iteration"] in [h["iteration"] for h in history]
    assert student.selection["synthetic"] > 0 and student.selection["good"] > 0
    assert m.files["weights.pt"] == teacher_sha  # the teacher is kept as it was
    assert not checkpoint_dir(b).exists()


def test_distilled_bundle_scores_and_recalibrates(calibrated_bundle, line_dir, tmp_path, caplog):
    b = copy_of(calibrated_bundle, tmp_path)
    with caplog.at_level("INFO", logger="diffinspect"):
        result = distill(b, steps=2, iterations=4, **QUIET)
    assert any("re-calibrating for the student" in s for s in caplog.messages), caplog.messages
    n_good = len(list((line_dir / "test" / "good").iterdir()))
    assert result["calibration"]["n"] == n_good  # the same folder as before, not the holdout
    assert Bundle.load(b).manifest.calibration.sampler == "student"

    color = Bundle.load(b).manifest.preprocess.color
    frames = [read_image(p, color) for p in sorted((line_dir / "test" / "good").iterdir())[:3]]
    det = load_detector(b)  # the student by default
    assert len(det.engine.graph.path) == 2
    scored = det.score(frames)
    assert scored.scores.shape == (3,) and np.isfinite(scored.scores).all()

    # backend="torch": auto would self-check the teacher against the student's calibration scores.
    calibrate(b, line_dir / "test" / "good", false_reject_rate=0.1, backend="torch", sampler="teacher")
    det = load_detector(b)
    assert len(det.engine.graph.path) == 10  # the teacher at the steps it was distilled from
    assert np.isfinite(det.score(frames).scores).all()
    assert Bundle.load(b).manifest.sampler.default == "student"


def test_interrupted_distillation_resumes_where_it_stopped(trained_bundle, tmp_path):
    a, b = copy_of(trained_bundle, tmp_path, "a"), copy_of(trained_bundle, tmp_path, "b")
    args = {**QUIET, "steps": 2, "iterations": 6, "batch_size": 4}

    def interrupt(task, it, total, loss, seconds):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(DiffinspectError, match="--resume"):
        distill(a, progress=interrupt, **args)
    assert (checkpoint_dir(a) / "last.pt").exists()
    resumed = distill(a, resume=True, **args)
    whole = distill(b, **args)
    assert resumed["iterations"] == whole["iterations"] == 6
    assert [h["iteration"] for h in resumed["selection"]["history"]] == [0, 2, 3, 5, 6]
    sa = torch.load(Bundle.load(a).file("student.pt"), weights_only=True)
    sb = torch.load(Bundle.load(b).file("student.pt"), weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_without_checkpoint_and_bad_arguments(trained_bundle, tmp_path):
    b = copy_of(trained_bundle, tmp_path)
    with pytest.raises(DiffinspectError, match="nothing to resume"):
        distill(b, resume=True, **QUIET)
    for steps in (0, 3, 8):
        with pytest.raises(DiffinspectError, match="1, 2 or 4"):
            distill(b, steps=steps, **QUIET)
    with pytest.raises(DiffinspectError, match="must exceed"):
        distill(b, steps=4, teacher_steps=4, **QUIET)
    assert not Bundle.load(b).manifest.sampler.student


@pytest.mark.parametrize(("flags", "message"), [(["--steps", "3"], "student steps must be 1, 2 or 4"),
                                               (["--heal", "1.5"], "defect share must be between 0 and 1")])
def test_cli_rejects_bad_arguments_in_one_line(trained_bundle, flags, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "diffinspect", "distill", str(trained_bundle), *flags],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_calibration_folder_is_read_back_from_the_manifest():
    assert str(calibration_folder(Calibration(1.0, 0.1, 20, folder="/data/good"))) == "/data/good"
    assert calibration_folder(Calibration(1.0, 0.1, 20, folder=None)) is None
    assert calibration_folder(Calibration(1.0, 0.1, 20)) is None


def test_exports_that_distillation_makes_stale():
    from diffinspect.train.distill import _stale_exports

    manifest = Manifest(preprocess=Preprocess(), score=Recipe(steps=1), exports={
        "model.onnx": Export("onnx", "fp32", "teacher"),
        "openvino/model.xml": Export("openvino", "fp32", "student", files=["openvino/model.xml",
                                                                           "openvino/model.bin"])})
    # The teacher sampler goes from the recipe's 1 step to 10: both exports are stale.
    assert _stale_exports(manifest, 10) == {"model.onnx": ["model.onnx"],
                                            "openvino/model.xml": ["openvino/model.xml", "openvino/model.bin"]}
    # Same teacher steps as before: only the student's export is stale.
    assert list(_stale_exports(manifest, 1)) == ["openvino/model.xml"]


def test_healing_pool_pastes_defects_on_inputs_but_keeps_clean_targets(trained_bundle, line_dir):
    from diffinspect.models.from_bundle import load_graph
    from diffinspect.train.selection import read_frames
    from diffinspect.train.targets import TargetPool

    bundle = Bundle.load(trained_bundle)
    prep = bundle.manifest.preprocess
    frames = read_frames(sorted((line_dir / "train" / "good").iterdir())[:4], prep)
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
    teacher = load_graph(bundle, "teacher")
    pools = {}
    for share in (0.0, 1.0):
        pools[share] = TargetPool(images, teacher, 6, torch.Generator().manual_seed(0), defect_share=share)
        pools[share].refresh(6)
    clean, healing = pools[0.0], pools[1.0]
    assert torch.equal(clean.target, healing.target)  # the teacher rebuilt the clean images
    assert torch.equal(clean.eps, healing.eps)
    changed = (clean.x - healing.x).abs().flatten(1).amax(1)
    assert (changed > 0.1).all(), changed  # every input carries a visible pasted defect
    with pytest.raises(DiffinspectError, match="defect share"):
        distill(trained_bundle, steps=1, defect_share=1.5, **QUIET)
