from pathlib import Path

import pytest

from diffinspect import DiffinspectError
from diffinspect.config import load_config

SAMPLES = sorted((Path(__file__).parent.parent / "sample_configs").glob("*.toml"))


def test_defaults_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nkind = "dit"\nsize = "tiny"\n[train]\nbatch_size = 4\n[train.augment]\nhflip = true\n')
    cfg = load_config(f, {"train.batch_size": 32, "model.size": None})
    assert cfg.model.kind == "dit"  # from the file
    assert cfg.model.size == "tiny"  # None means "flag not given"
    assert cfg.train.batch_size == 32  # the flag wins
    assert cfg.train.augment.hflip is True
    assert cfg.data.image_size is None  # default: chosen from the training frames
    f.write_text('[data]\nimage_size = [64, 160]\n')
    assert load_config(f).data.image_size == [64, 160]


@pytest.mark.parametrize(("text", "needle"), [
    ('[model]\nkindd = "unet"\n', "model.kindd"),
    ('[trainn]\nsteps = 3\n', "trainn"),
    ('[model]\nkind = "gan"\n', "model.kind"),
    ('[train]\nbatch_size = "big"\n', "train.batch_size"),
    ('[train]\nbatch_size = -1\n', "train.batch_size"),
    ('[data]\nholdout = 1.5\n', "data.holdout"),
    ('[data]\nroi = [1, 2]\n', "data.roi"),
    ('[data]\nimage_size = [64]\n', "data.image_size"),
    ('[data]\nimage_size = [64, -8]\n', "data.image_size"),
    ('[data]\nimage_size = "big"\n', "data.image_size"),
    ('[data]\ndefect_size = 0\n', "data.defect_size"),
    ('not toml [', "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(DiffinspectError, match=needle.replace("[", r"\[")):
        load_config(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(DiffinspectError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_configs_load(path):
    load_config(path)


def test_there_are_sample_configs():
    assert len(SAMPLES) >= 4
