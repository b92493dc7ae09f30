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


# What the README's table says of each sample config, as checks on the loaded config.
SAMPLE_CLAIMS = {
    # surfaces: flips allowed, tiles for small defects on large frames
    "texture_line.toml": lambda c: c.train.augment.hflip and c.train.augment.vflip and c.data.feed == "tiles",
    # aligned parts: no flips or shifts, aspect ratio kept (no fixed square), ROI line to fill in
    "object_line.toml": lambda c: (not (c.train.augment.hflip or c.train.augment.vflip or c.train.augment.rot90)
                                   and c.train.augment.shift == 0 and c.data.image_size is None),
    # CPU edge box: small model, one sampler step
    "edge_cpu.toml": lambda c: c.model.size == "small" and c.score.steps == 1 and c.train.device == "cpu",
    # GPU box: the base model at 128 px, trained longer than the CPU budget
    "gpu_box.toml": lambda c: (c.model.size == "base" and c.data.image_size == 128 and c.train.device == "cuda"
                               and c.train.steps >= 10_000),
}


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_configs_do_what_the_readme_says(path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"| `{path.name}` |" in readme  # every sample is in the table
    assert SAMPLE_CLAIMS[path.name](load_config(path))
    if path.name == "object_line.toml":
        assert "# roi = [x, y, width, height]" in path.read_text()


def test_every_sample_in_the_readme_exists():
    assert sorted(SAMPLE_CLAIMS) == sorted(p.name for p in SAMPLES)
