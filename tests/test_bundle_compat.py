"""Manifests written by earlier versions of main still load, typed; newer ones and hostile ones are refused.

tests/data/manifests/<commit>-<kind>.json were written by the code of <commit> (tiny models trained on
synthetic frames); the files they list are not kept, so these tests load without verifying checksums.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.bundle import SCHEMA_VERSION, Bundle, write_manifest
from diffinspect.vocab import FrameDetector, Fusion

MANIFESTS = Path(__file__).parent / "data" / "manifests"
OLD = sorted(MANIFESTS.glob("*.json"))


def load_old(tmp_path: Path, name: str, edit=None) -> Bundle:  # noqa: ANN001
    raw = json.loads((MANIFESTS / f"{name}.json").read_text())
    if edit is not None:
        edit(raw)
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(raw))
    return Bundle.load(folder, verify=False)


def test_there_is_a_manifest_of_every_kind():
    kinds = {p.stem.split("-", 1)[1] for p in OLD}
    assert {"trained", "calibrated", "cold_start", "distilled", "exported", "tiles"} <= kinds
    assert len({p.stem.split("-")[0] for p in OLD}) >= 5  # from several versions of main


@pytest.mark.parametrize("path", OLD, ids=lambda p: p.stem)
def test_every_old_manifest_loads_typed_and_round_trips(tmp_path, path):
    b = load_old(tmp_path, path.stem)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION and m.preprocess.color == "gray" and m.files
    kind = path.stem.split("-", 1)[1]
    if kind == "cold_start":
        assert m.model is None and m.score is None and math.isfinite(m.fallback.threshold)
        assert m.fallback.file in m.files and isinstance(m.fallback.n_fit, int)
    else:
        assert m.model.kind == "unet" and m.model.channels == 1 and b.recipe.t_star > 0
        assert b.schedule.timesteps == 1000 and m.training.steps == 3 and m.training.train_files
    if kind in ("calibrated", "exported", "tiles"):
        assert math.isfinite(m.calibration.threshold) and m.calibration.n > 0
    if kind == "distilled":
        assert m.sampler.default == "student" and m.student.weights in m.files
    if kind == "tiles":
        assert m.preprocess.feed == "tiles"
    if m.health is not None:  # fitted on whole frames: watch keeps decoding them whole
        assert m.health.read_side is None
    # Written again by this version, it reads back the same.
    write_manifest(b.path, m)
    assert Bundle.load(b.path, verify=False).manifest == m


def test_recipes_and_frame_terms_without_a_rule_keep_summing_with_copod(tmp_path):
    old = load_old(tmp_path, "5e06922-calibrated").manifest
    assert (old.score.fusion, old.score.frame_detector) == (Fusion.SUM, FrameDetector.COPOD)
    assert (old.calibration.frame_term.rule, old.calibration.frame_term.detector) == ("sum", "copod")
    new = load_old(tmp_path, "8d406ff-calibrated").manifest
    assert (new.score.fusion, new.calibration.frame_term.rule) == ("minp", "minp")


def test_copod_figures_written_as_text_are_numbers(tmp_path):
    raw = json.loads((MANIFESTS / "8d406ff-cold_start.json").read_text())["fallback"]
    fallback = load_old(tmp_path, "8d406ff-cold_start").manifest.fallback
    assert isinstance(raw["threshold"], str) and fallback.threshold == float(raw["threshold"])
    assert fallback.n_fit == int(raw["n_fit"]) and fallback.file == raw["embeddings_file"]


@pytest.mark.parametrize("name", ["8371446-exported", "8d406ff-exported"])
def test_exports_that_were_current_stay_current(tmp_path, name):
    m = load_old(tmp_path, name).manifest
    assert m.exports
    for rec in m.exports.values():
        assert rec.fingerprint == m.graph_fingerprint(rec.sampler)
    # An export of another recipe is still stale after the upgrade.
    m = load_old(tmp_path / "edited", name, lambda raw: raw["score"].update(top_k=0.5)).manifest
    assert all(rec.fingerprint != m.graph_fingerprint(rec.sampler) for rec in m.exports.values())


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path):
    with pytest.raises(DiffinspectError, match=rf"schema version {SCHEMA_VERSION + 1}, newer .*\({SCHEMA_VERSION}\)"):
        load_old(tmp_path, "8d406ff-trained", lambda raw: raw.update(schema_version=SCHEMA_VERSION + 1))


@pytest.mark.parametrize(("key", "edit"), [
    ("fallback.threshold", lambda m: m["fallback"].update(threshold="nan")),
    ("fallback.n_fit", lambda m: m["fallback"].update(n_fit="many")),
    ("preprocess.color", lambda m: m["preprocess"].update(color="auto")),
    ("preprocess.roi", lambda m: m["preprocess"].update(roi=[0, 0, 10])),
    ("model.kind", lambda m: m["model"].update(kind="cnn")),
    ("model.image_size", lambda m: m["model"].update(image_size=[4, 4])),
    ("score.fusion", lambda m: m["score"].update(fusion="mean")),
    ("score.top_k", lambda m: m["score"].update(top_k=None)),
    ("calibration.false_reject_rate", lambda m: m["calibration"].update(false_reject_rate=0)),
    ("calibration.frame_term.rule", lambda m: m["calibration"]["frame_term"].update(rule="mean")),
    ("calibration.frame_term.diffusion", lambda m: m["calibration"]["frame_term"].update(diffusion=[1.0])),
    ("health.n", lambda m: m["health"].update(n="many")),
    ("health.read_side", lambda m: m["health"].update(read_side=0)),
    ("sampler.default", lambda m: m["sampler"].update(default="oracle")),
    ("training.train_files[0]", lambda m: m["training"]["train_files"].__setitem__(0, 7)),
    ("calibration", lambda m: m.update(calibration=[1, 2])),
])
def test_a_hostile_field_is_one_error_naming_it(tmp_path, key, edit):
    with pytest.raises(DiffinspectError, match=f"field {key.replace('[', '.').replace(']', '.')} "):
        load_old(tmp_path, "8d406ff-calibrated", edit)


def test_old_copod_bundle_scores_as_it_did(tmp_path, line_dir):
    """A cold-start bundle of today, its manifest written back in the version-1 form (figures as repr
    text, the file under embeddings_file), scores the same frames the same."""
    from diffinspect.data.image import read_image
    from diffinspect.scoring.cold_start import calibrate_copod_only
    from diffinspect.scoring.loader import load_fallback

    new = tmp_path / "new"
    calibrate_copod_only(line_dir / "train" / "good", new, 0.1)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    folder = Bundle.load(old, verify=False).folder  # the active version's files
    raw = json.loads((folder / "manifest.json").read_text())
    fb = raw["fallback"]
    raw["schema_version"] = 1
    raw["fallback"] = {**{k: repr(v) if isinstance(v, float) else str(v) for k, v in fb.items() if k != "file"},
                       "false_reject_rate": repr(fb["false_reject_rate"]), "embeddings_file": fb["file"]}
    write_manifest(folder, raw)
    frames = [read_image(p, "gray") for p in sorted((line_dir / "test").glob("*/*.png"))[:6]]
    a, b = load_fallback(new), load_fallback(old)
    assert a.threshold == b.threshold and b.false_reject_rate == 0.1
    assert np.array_equal(a.score(frames).scores, b.score(frames).scores)
