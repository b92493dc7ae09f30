"""Shared fixtures: small synthetic data made by the tests, caches kept out of $HOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="diffinspect-test-cache-"))
os.environ.setdefault("MPLCONFIGDIR", str(_CACHE / "mpl"))
os.environ.setdefault("OV_CACHE_DIR", str(_CACHE / "ov"))
os.environ["HOME"] = str(_CACHE)  # onnxruntime / OpenVINO / matplotlib caches


@pytest.fixture(scope="session")
def line_dir(tmp_path_factory) -> Path:
    """A small synthetic production line (MVTec layout), 64 px, shared by the whole session."""
    from diffinspect.data.synthetic import make_line

    root = tmp_path_factory.mktemp("line") / "metal"
    return make_line(root, "metal", n_train=60, n_test_good=24, n_test_defect=20, size=64, seed=0)


@pytest.fixture(scope="session")
def trained_bundle(line_dir, tmp_path_factory) -> Path:
    """A tiny U-Net bundle trained a few steps on the synthetic line (not calibrated)."""
    from diffinspect.config import load_config
    from diffinspect.train import train

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    cfg = load_config(overrides={"model.size": "tiny", "data.image_size": 32, "train.steps": 60,
                                 "train.batch_size": 8, "data.holdout": 0.3})
    train(line_dir, out, cfg)
    return out


@pytest.fixture(scope="session")
def calibrated_bundle(trained_bundle, line_dir, tmp_path_factory) -> Path:
    """A copy of the tiny bundle, calibrated on the synthetic line's good test images."""
    import shutil

    from diffinspect.scoring.calibrate import calibrate

    out = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(trained_bundle, out)
    calibrate(out, line_dir / "test" / "good", false_reject_rate=0.1)
    return out


@pytest.fixture(scope="session")
def distilled_bundle(calibrated_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the calibrated bundle with a one-step student (40 iterations, each checkpoint chosen on a few
    images), and what distill returned: made once for the tests that check the student, which only read it."""
    import shutil

    from diffinspect.train import selection
    from diffinspect.train.distill import distill

    out = tmp_path_factory.mktemp("distilled") / "tiny"
    shutil.copytree(calibrated_bundle, out)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(selection, "MAX_GOOD", 8)
        m.setattr(selection, "STATS_IMAGES", 8)
        result = distill(out, steps=1, iterations=40, device="cpu", batch_size=8)
    return out, result


# A test that needs a trained model pays for training (and often export) before it runs: slow by rule,
# so `pytest -m "not slow"` never builds these fixtures. Other slow tests carry @pytest.mark.slow.
TRAINED_FIXTURES = {"trained_bundle", "calibrated_bundle", "distilled_bundle", "exported", "tiles_bundle",
                    "wide_bundle"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_runtest_setup(item: pytest.Item) -> None:
    from services import missing

    for marker in item.iter_markers("needs_service"):
        what, available = marker.args
        if not available:
            missing(what)


@pytest.fixture(autouse=True)
def _diffinspect_loggers_enabled() -> None:
    """A library that configures logging with disable_existing_loggers (logging.config's default) switches
    off loggers created before it; a later test reading diffinspect's records with caplog would then see
    none. Each test starts with them enabled."""
    import logging

    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("diffinspect") and isinstance(logger, logging.Logger):
            logger.disabled = False
