from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.config import load_config
from diffinspect.data.image import read_image
from diffinspect.models.from_bundle import load_denoiser
from diffinspect.scoring.calibrate import calibrate
from diffinspect.scoring.loader import load_detector
from diffinspect.train import loop, train
from diffinspect.train.api import snapshot_path
from diffinspect.train.fit import checkpoint_dir


def tiny(**over):
    base = {"model.size": "tiny", "data.image_size": 32, "train.batch_size": 8, "train.steps": 4}
    base.update(over)
    return load_config(overrides=base)


def losses_of(line_dir, tmp_path, kind):
    seen = []
    train(line_dir, tmp_path / kind, tiny(**{"model.kind": kind, "train.steps": 50}),
          progress=lambda task, step, total, loss, seconds: seen.append(loss))
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_loss_falls_and_bundle_loads(line_dir, tmp_path, kind):
    seen = losses_of(line_dir, tmp_path, kind)
    assert len(seen) == 50
    assert seen[-1] < 0.8 * seen[2], (seen[2], seen[-1])
    b = Bundle.load(tmp_path / kind)
    assert b.manifest.model.kind == kind
    model = load_denoiser(b)
    x = torch.zeros(1, b.manifest.model.channels, 32, 32)
    assert model(x, torch.zeros(1)).shape == x.shape


@pytest.mark.slow
def test_deterministic_on_cpu(line_dir, tmp_path):
    a = train(line_dir, tmp_path / "a", tiny())
    b = train(line_dir, tmp_path / "b", tiny())
    sa = torch.load(a.file("weights.pt"), weights_only=True)
    sb = torch.load(b.file("weights.pt"), weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_interrupt_saves_checkpoint_and_resume_continues(line_dir, tmp_path):
    out = tmp_path / "b"

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(DiffinspectError, match="--resume"):
        train(line_dir, out, tiny(**{"train.steps": 6}), on_step=interrupt)
    assert (checkpoint_dir(out) / "last.pt").exists()
    assert not out.exists()  # never a half-written bundle
    steps = []
    b = train(line_dir, out, tiny(**{"train.steps": 6}), resume=True,
              progress=lambda task, step, total, **detail: steps.append((task, step, total)))
    assert steps == [("training", 4, 6), ("training", 5, 6), ("training", 6, 6)]
    assert b.manifest.training.steps == 6
    # An uninterrupted run draws the same batches: same weights.
    ref = train(line_dir, tmp_path / "ref", tiny(**{"train.steps": 6}))
    sa = torch.load(b.file("weights.pt"), weights_only=True)
    sr = torch.load(ref.file("weights.pt"), weights_only=True)
    assert all(torch.allclose(sa[k], sr[k], atol=1e-6) for k in sa)
    assert not checkpoint_dir(out).exists()


def test_resume_without_checkpoint(line_dir, tmp_path):
    with pytest.raises(DiffinspectError, match="nothing to resume"):
        train(line_dir, tmp_path / "x", tiny(), resume=True)


def write_images(folder: Path, n: int, bad: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (40, 48), dtype=np.uint8))
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    return folder


def test_bad_inputs(tmp_path):
    with pytest.raises(DiffinspectError, match="not found"):
        train(tmp_path / "missing", tmp_path / "o", tiny())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffinspectError, match="no images"):
        train(tmp_path / "empty", tmp_path / "o", tiny())
    few = write_images(tmp_path / "few", 8, bad=4)
    with pytest.raises(DiffinspectError, match="at least 10"):
        train(few, tmp_path / "o", tiny())
    ok = write_images(tmp_path / "ok", 14)
    with pytest.raises(DiffinspectError, match="multiple of"):
        train(ok, tmp_path / "o", tiny(**{"data.image_size": 36}))
    if not torch.cuda.is_available():
        with pytest.raises(DiffinspectError, match="CUDA"):
            train(ok, tmp_path / "o", tiny(**{"train.device": "cuda"}))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_undecodable_files_are_skipped_and_counted(tmp_path, caplog):
    data = write_images(tmp_path / "d", 16, bad=2)
    with caplog.at_level("WARNING", logger="diffinspect"):
        b = train(data, tmp_path / "o", tiny(**{"data.holdout": 0.0}))
    assert "skipped 2 undecodable" in caplog.text
    assert len(b.manifest.training.skipped) == 2
    assert b.manifest.preprocess.color == "gray"


def test_snapshots_count_training_minutes_not_their_own_writing(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loop, "cpu_minutes", lambda: clock[0])
    taken = []

    def write(minutes, step):
        taken.append((minutes, step, clock[0]))
        clock[0] += 10.0  # a slow write: must not count as training

    snaps = loop.Snapshots([3, 1], write)
    for step in range(8):
        snaps.tick(step)
        clock[0] += 0.5
    assert taken == [(1, 2, 1.0), (3, 6, 13.0)]
    assert snaps.done
    with pytest.raises(DiffinspectError, match="positive"):
        loop.Snapshots([0, 1], write)


def test_snapshots_are_bundles_that_score_and_the_last_ends_training(line_dir, tmp_path):
    out, seen = tmp_path / "b", []
    cfg = load_config(overrides={"model.size": "tiny", "data.image_size": 32, "train.batch_size": 8,
                                 "data.holdout": 0.3})
    # Budgets of whole seconds of CPU: on loaded cores one step of spinning threads takes a good part of one.
    final = train(line_dir, out, cfg, snapshots=[0.06, 0.02],
                  on_snapshot=lambda minutes, b: seen.append((minutes, b.path, loop.cpu_minutes())))
    assert [(m, p) for m, p, _ in seen] == [(0.02, snapshot_path(out, 0.02)), (0.06, snapshot_path(out, 0.06))]
    steps = [Bundle.load(p).manifest.training.steps for _, p, _ in seen]
    assert 0 < steps[0] < steps[1] == final.manifest.training.steps
    assert seen[1][2] - seen[0][2] >= 0.04  # at least the CPU minutes between the two snapshots
    frames = [read_image(p, "rgb") for p in sorted((line_dir / "test" / "good").iterdir())[:3]]
    for _, path, _ in seen:
        calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, backend="torch")
        scored = load_detector(path, backend="torch").score(frames)
        assert scored.scores.shape == (3,) and np.isfinite(scored.scores).all()


def test_snapshots_do_not_end_a_training_given_its_steps(line_dir, tmp_path):
    cfg = load_config(overrides={"model.size": "tiny", "data.image_size": 32, "train.batch_size": 8,
                                 "data.holdout": 0.3, "train.steps": 12})
    seen = []
    final = train(line_dir, tmp_path / "b", cfg, snapshots=[1e-6], on_snapshot=lambda m, b: seen.append(m))
    assert seen == [1e-6] and final.manifest.training.steps == 12
