"""Re-learning from the line: reviewed good parts into calibration, new good images into a fine-tune."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.bundle import ADDED_DIR, Bundle, Samplers, Student, sha256_file
from diffinspect.models.from_bundle import load_denoiser
from diffinspect.models.patches import PATCH_FILE
from diffinspect.scoring.calibrate import calibrate, image_sets
from diffinspect.scoring.threshold import conformal_threshold
from diffinspect.vocab import Sampler


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def test_added_images_are_hashed_copies_listed_and_verified(calibrated_bundle, line_dir, tmp_path):
    bundle = _copy(calibrated_bundle, tmp_path)
    good = sorted((line_dir / "train" / "good").iterdir())[:3]
    with Bundle.load(bundle).updating() as up:
        assert up.add_images(good + good[:1], "calibration", "reviewed good parts", "OUT") == 3
    loaded = Bundle.load(bundle)
    names = loaded.manifest.added.calibration
    assert names == [f"{ADDED_DIR}/{sha256_file(p)}{p.suffix.lower()}" for p in good]
    assert all(loaded.has(n) for n in names)
    assert loaded.manifest.added.history[-1]["images"] == 3
    assert loaded.manifest.added.history[-1]["already_in_bundle"] == 1
    with Bundle.load(bundle).updating() as up:  # the same images again: nothing new
        assert up.add_images(good, "calibration", "reviewed good parts", "OUT") == 0
    # the copies are the bundle's own: calibration reads them, not the camera's files
    active = Bundle.load(bundle)
    reference, calib, described = image_sets(active, line_dir / "test" / "good")
    assert [p for p in calib if p.parent.name == ADDED_DIR] == [active.folder / n for n in names]
    assert "3 added to the bundle" in described
    (active.folder / names[0]).write_bytes(b"altered")
    with pytest.raises(DiffinspectError, match="altered"):
        Bundle.load(bundle)


def test_calibration_counts_the_added_images(calibrated_bundle, line_dir, tmp_path):
    bundle = _copy(calibrated_bundle, tmp_path)
    before = Bundle.load(bundle).manifest.calibration
    good = sorted((line_dir / "train" / "good").iterdir())[:5]
    with Bundle.load(bundle).updating() as up:
        up.add_images(good, "calibration", "reviewed good parts", "OUT")
    result = calibrate(bundle, line_dir / "test" / "good", false_reject_rate=0.1)
    assert result.n == before.n + 5


def test_finetune_starts_from_the_weights_moves_reviewed_to_training_and_recalibrates(
        calibrated_bundle, line_dir, tmp_path):
    from diffinspect.train.finetune import finetune

    bundle = _copy(calibrated_bundle, tmp_path)
    reviewed = sorted((line_dir / "train" / "good").iterdir())[:4]
    with Bundle.load(bundle).updating() as up:
        up.add_images(reviewed, "calibration", "reviewed good parts", "OUT")
    new = tmp_path / "new_good"
    new.mkdir()
    for p in sorted((line_dir / "train" / "good").iterdir())[10:22]:
        shutil.copy(p, new / p.name)
    with Bundle.load(bundle).updating() as up:  # a distilled student of the old model
        up.write_bytes("student.pt", b"the old model's student")
        up.manifest.sampler = Samplers(Sampler.STUDENT, Student("student.pt", steps=1))
    old = load_denoiser(Bundle.load(bundle)).state_dict()
    old_patches = Bundle.load(bundle).manifest.files[PATCH_FILE]
    result = finetune(bundle, new, steps=3)
    loaded = Bundle.load(bundle)
    tuned = load_denoiser(loaded).state_dict()
    assert result.steps == 3 and result.images == 16 and result.new == 12 and result.reviewed == 4
    # three small steps from the old weights: changed, but close to them (a fresh model would be far)
    change = max(float((tuned[k] - old[k]).abs().max()) for k in old if old[k].is_floating_point())
    assert 0 < change < 0.05
    assert loaded.manifest.files[PATCH_FILE] != old_patches  # refitted on the new weights' features
    assert loaded.manifest.student is None and not loaded.has("student.pt") and not (bundle / "student.pt").exists()
    added = loaded.manifest.added
    assert added.calibration == [] and len(added.training) == 16
    assert added.history[-1]["reviewed_now_training"] == 4 and added.history[-1]["steps"] == 3
    # calibrated again as before: same folder and rate, without the images it now trained on
    cal = loaded.manifest.calibration
    assert cal.folder == str((line_dir / "test" / "good").resolve()) and cal.false_reject_rate == 0.1
    assert cal.n == len(list((line_dir / "test" / "good").iterdir()))
    assert result.recalibrated is not None and "24 good images" in result.recalibrated
    assert not (bundle.parent / "bundle.checkpoint").exists()


def test_finetune_refuses_an_empty_folder(calibrated_bundle, tmp_path):
    from diffinspect.train.finetune import finetune

    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffinspectError, match="no images"):
        finetune(calibrated_bundle, tmp_path / "empty", steps=1)


def test_finetune_default_steps_are_a_quarter(calibrated_bundle):
    from diffinspect.train.finetune import finetune_config

    cfg = finetune_config(Bundle.load(calibrated_bundle), None, None, None, None)
    assert cfg.train.steps == 60 // 4 and cfg.train.batch_size == 8 and cfg.model.size == "tiny"


def test_calibrate_add_reviewed_copies_the_good_parts_and_says_what_it_skipped(calibrated_bundle, line_dir, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from test_station import rows

    from diffinspect.store.results import ResultStore
    from diffinspect.store.reviews import ReviewWriter

    bundle = _copy(calibrated_bundle, tmp_path)
    n_before = Bundle.load(bundle).manifest.calibration.n
    out = tmp_path / "out"
    store = ResultStore(out)
    recs = [r for r in rows(12, 0, time.time(), out) if r.status == "ng"]
    frames = sorted((line_dir / "train" / "good").iterdir())[:len(recs)]
    for r, frame in zip(recs, frames, strict=True):  # the line's frames: kept where the camera wrote them
        r.path = str(tmp_path / "cam" / frame.name)
        Path(r.path).parent.mkdir(exist_ok=True)
        shutil.copy(frame, r.path)
        st = Path(r.path).stat()
        r.size, r.mtime_ns = st.st_size, st.st_mtime_ns
    store.commit(recs)
    store.close()
    with ReviewWriter(out / "results.db") as w:
        for r in recs:
            w.add(r.id, "good", "anna")
    Path(recs[-1].path).unlink()  # deleted by the line since
    run = subprocess.run([sys.executable, "-m", "diffinspect", "calibrate", str(bundle),
                          str(line_dir / "test" / "good"), "--false-reject-rate", "0.1", "--add-reviewed", str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    kept = len(recs) - 1
    assert f"{kept} reviewed good part(s) added" in run.stderr and "1 skipped: their frame file is gone" in run.stderr
    manifest = Bundle.load(bundle).manifest
    assert len(manifest.added.calibration) == kept and manifest.calibration.n == n_before + kept
    assert all(Path(r.path).exists() for r in recs[:-1])  # the camera's files stay where they are


def test_good_parts_that_were_rejected_only_raise_the_threshold():
    """Reviewed false rejects scored above the threshold: calibrating with them added never lowers it."""
    rng = np.random.default_rng(0)
    for n, alpha in ((100, 0.05), (300, 0.01), (1000, 0.01)):
        scores = rng.normal(size=n)
        before = conformal_threshold(scores, alpha)
        for m in (1, 5, 50):
            rejected = before + rng.exponential(size=m)
            assert conformal_threshold(np.concatenate([scores, rejected]), alpha) >= before
