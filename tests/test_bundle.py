import json

import pytest

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle


def test_bundle_round_trip(trained_bundle):
    b = Bundle.load(trained_bundle)
    assert b.manifest.model.kind == "unet"
    assert set(b.manifest.files) == {"weights.pt", "patches.npz"}  # patches: the patch term's statistics
    assert b.manifest.training.holdout_files
    assert not set(b.manifest.training.holdout_files) & set(b.manifest.training.train_files)


def test_flipped_byte_is_refused(trained_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(trained_bundle, copy)
    w = Bundle.load(copy, verify=False).folder / "weights.pt"  # the active version's file
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(DiffinspectError, match="weights.pt"):
        Bundle.load(copy)


def test_missing_file_is_named(trained_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(trained_bundle, copy)
    (Bundle.load(copy, verify=False).folder / "weights.pt").unlink()
    with pytest.raises(DiffinspectError, match="missing weights.pt"):
        Bundle.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(DiffinspectError, match="not found"):
        Bundle.load(tmp_path / "none")
    (tmp_path / "x").mkdir()
    with pytest.raises(DiffinspectError, match="manifest.json is missing"):
        Bundle.load(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DiffinspectError, match="schema version"):
        Bundle.load(tmp_path / "x")
