"""Hostile input and fresh installs: one line and exit 2 for user errors, never an `ok` from a NaN, no
file outside a bundle read or deleted, no decompression bomb decoded."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, check_output, is_bundle, sha256_file, write_manifest
from diffinspect.data.image import MIN_FRAME_SIDE, ImageError, decode_image, header_size, read_image
from diffinspect.scoring.inspector import label_for


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The real entry point, in process: (exit code, stdout, stderr). Any exception that escapes main()
    (a traceback for the user) fails the test that called it."""
    from diffinspect.cli import main

    argv = sys.argv
    sys.argv = ["inspect", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and carries a few bytes of (truncated) data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def cold_bundle(line_dir, tmp_path_factory) -> Path:
    """A COPOD-only bundle (cold start): fast to make, loads without torch."""
    from diffinspect.scoring.cold_start import calibrate_copod_only

    out = tmp_path_factory.mktemp("cold") / "b"
    calibrate_copod_only(line_dir / "train" / "good", out, 0.1)
    return out


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    folder = Bundle.load(dst, verify=False).folder  # the active version's files
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return dst


# --- 1. usage errors: one line, exit 2, whatever is installed --------------------------------------


def test_usage_error_is_one_line_without_click():
    # Typer 0.29 vendors click: a fresh install has no `click` module at all.
    code = ("import sys; sys.modules['click'] = None; from diffinspect.cli import main; "
            "sys.argv = ['inspect', 'score', '--bogus']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "--bogus" in r.stderr


def test_every_command_refuses_bad_arguments_in_one_line(capsys, tmp_path, line_dir, cold_bundle):
    good = line_dir / "train" / "good"
    img = next(good.iterdir())
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cfg_dir = tmp_path / "cfgdir"
    cfg_dir.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[train]\n# caf\xe9\nlr = 0.001\n")
    nan_cfg = tmp_path / "nan.toml"
    nan_cfg.write_text("[train]\nlr = nan\n")
    nan_bundle = edited(cold_bundle, tmp_path / "nanb", lambda m: m["fallback"].update(threshold="nan"))
    out = tmp_path / "new"
    cases = [
        ["--bogus"],
        ["train"],
        ["train", tmp_path / "nope", "--out", out],
        ["train", good, "--out", out, "--steps", "abc"],
        ["train", good, "--out", out, "--model", "bogus"],
        ["train", good, "--out", out, "--max-minutes", "nan"],
        ["train", good, "--out", out, "--config", cfg_dir],
        ["train", good, "--out", out, "--config", latin1],
        ["train", good, "--out", out, "--config", nan_cfg],
        ["train", good, "--out", out, "--config", tmp_path / "missing.toml"],
        ["train", good, "--out", user, "--overwrite"],
        ["train", good, "--out", a_file / "sub"],
        ["calibrate"],
        ["calibrate", "--detector", "copod", good],
        ["calibrate", tmp_path / "nope"],
        ["calibrate", cold_bundle, "--false-reject-rate", "nan"],
        ["calibrate", "--detector", "copod", good, "--out", out, "--false-reject-rate", "2"],
        ["score"],
        ["score", tmp_path / "nope", img],
        ["score", cold_bundle, tmp_path / "nope.png"],
        ["score", cold_bundle, img, "--detector", "bogus"],
        ["score", nan_bundle, img],
        ["score", cold_bundle, img, "--backend", "bogus"],
        ["watch"],
        ["watch", tmp_path / "nope", "--model", cold_bundle, "--once"],
        ["watch", good, "--model", tmp_path / "nope", "--once"],
        ["watch", good, "--model", user, "--once"],
        ["evaluate", cold_bundle],
        ["evaluate", cold_bundle, tmp_path / "nope"],
        ["evaluate", cold_bundle, line_dir, "--baselines", "bogus", "--report", tmp_path / "r"],
        ["watch", good, "--model", cold_bundle, "--once", "--batch", "0", "--out", tmp_path / "w"],
        ["distill", tmp_path / "nope"],
        ["distill", cold_bundle, "--steps", "abc"],
        ["distill", cold_bundle],
        ["export", tmp_path / "nope"],
        ["info", tmp_path / "nope"],
        ["info", nan_bundle],
        ["demo", "--workdir", a_file],
    ]
    for args in cases:
        code, _, err = run_cli(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2, (args, code, err)
        assert len(lines) == 1 and "Traceback" not in err, (args, err)
    assert (user / "notes.txt").read_text() == "keep me"
    assert not out.exists()


# --- 2. cold start on the edge install -----------------------------------------------------------


def test_runtime_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import diffinspect.scoring.cold_start, diffinspect.scoring.loader, diffinspect.scoring.score\n"
            "import diffinspect.cli, diffinspect.info\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# --- 4. a NaN never means OK; manifests are validated -------------------------------------------


def test_label_of_a_non_finite_score_is_error():
    assert label_for(float("nan"), 1.0) == "error"
    assert label_for(1.0, float("nan")) == "error"
    assert label_for(float("inf"), 1.0) == "error"
    assert label_for(2.0, 1.0) == "ng" and label_for(0.5, 1.0) == "ok"


@pytest.mark.parametrize("value", [float("nan"), None, "high", True, float("inf")])
def test_bad_diffusion_threshold_is_refused_naming_the_field(calibrated_bundle, tmp_path, value):
    # json.dumps writes NaN / Infinity tokens, as a hand-edited or hostile manifest would hold.
    b = edited(calibrated_bundle, tmp_path / "b", lambda m: m["calibration"].update(threshold=value))
    with pytest.raises(DiffinspectError, match="calibration.threshold"):
        Bundle.load(b)


def test_nan_statistics_give_error_records_and_valid_json(calibrated_bundle, line_dir, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(calibrated_bundle, b)
    folder = Bundle.load(b, verify=False).folder
    with np.load(folder / "calibration.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mean"] = np.full_like(arrays["mean"], np.nan)
    np.savez(folder / "calibration.npz", **arrays)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["calibration.npz"] = sha256_file(folder / "calibration.npz")
    write_manifest(folder, m)
    defect = next((line_dir / "test").glob("*/*.png"))
    code, out, _ = run_cli(capsys, "score", b, defect, "--backend", "torch", "--json")
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in JSON output")) for line in
               out.splitlines()]
    assert [r["label"] for r in records] == ["error"]
    assert "finite" in records[0]["error"] and records[0]["score"] is None
    assert code == 1  # every image was an error


@pytest.mark.parametrize("name", ["../victim.txt", "/etc/hostname", "sub/../../victim.txt", "link/victim.txt"])
def test_manifest_paths_outside_the_bundle_are_refused(cold_bundle, tmp_path, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    b = tmp_path / "b"
    shutil.copytree(cold_bundle, b)
    folder = Bundle.load(b, verify=False).folder
    (folder / "link").symlink_to(tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][name] = sha256_file(victim)
    write_manifest(folder, m)
    with pytest.raises(DiffinspectError, match="outside the bundle"):
        Bundle.load(b)
    assert victim.exists()


def test_removing_a_file_never_leaves_the_bundle(cold_bundle, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    b = tmp_path / "b"
    shutil.copytree(cold_bundle, b)
    bundle = Bundle.load(b)
    bundle.manifest.files["../victim.txt"] = sha256_file(victim)  # as a stale export record would list it
    with pytest.raises(DiffinspectError, match="outside the bundle"), bundle.updating() as up:
        up.remove_file("../victim.txt")
    assert victim.read_text() == "user data"


# --- 6. decompression bombs ----------------------------------------------------------------------


def test_pixel_limit_holds_before_decoding(monkeypatch):
    bomb = png_header_only(60000, 60000)
    assert header_size(bomb) == (60000, 60000)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded a frame over the limit"))
    with pytest.raises(ImageError, match=r"3600.0 MP\) exceeds the limit of 50 MP"):
        decode_image(bomb, "gray")


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_header_size_matches_the_decoder(ext):
    img = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    ok, enc = cv2.imencode(ext, img)
    assert ok and header_size(enc.tobytes()) == (53, 37)
    assert decode_image(enc.tobytes(), "rgb").shape == (37, 53, 3)


def test_score_gives_records_for_the_other_files_next_to_a_bomb(cold_bundle, line_dir, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_header_only(60000, 60000))
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((1, 1), np.uint8))
    for f in sorted((line_dir / "test" / "good").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    code, out, _ = run_cli(capsys, "score", cold_bundle, folder, "--json")
    records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert code == 0 and len(records) == 4
    assert records["bomb.png"]["label"] == "error" and "exceeds the limit" in records["bomb.png"]["error"]
    assert records["tiny.png"]["label"] == "error" and "too small" in records["tiny.png"]["error"]
    assert sum(r["label"] in ("ok", "ng") for r in records.values()) == 2


def test_a_thin_frame_gets_a_bounded_overlay_and_the_next_frames_are_scored(cold_bundle, line_dir, tmp_path,
                                                                            capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    strip = np.random.default_rng(0).integers(0, 255, (8, 20000), dtype=np.uint8)
    cv2.imwrite(str(folder / "a_strip.png"), strip)
    for f in sorted((line_dir / "test" / "good").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    code, out, err = run_cli(capsys, "score", cold_bundle, folder, "--json", "--overlay-dir", tmp_path / "ov")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 3 and all(r["label"] in ("ok", "ng") for r in records)
    overlay = cv2.imread(records[0]["overlay"])
    assert overlay.shape[1] <= 4096 and overlay.shape[0] < 1000


def test_a_frame_too_small_to_score_is_an_error(tmp_path):
    p = tmp_path / "small.png"
    cv2.imwrite(str(p), np.zeros((MIN_FRAME_SIDE - 1, 64), np.uint8))
    with pytest.raises(ImageError, match="too small"):
        read_image(p, "gray")


# --- 7. --overwrite replaces only a bundle -------------------------------------------------------


def test_overwrite_replaces_a_bundle_but_never_user_files(cold_bundle, tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"precious")
    with pytest.raises(DiffinspectError, match="holds no diffinspect bundle"):
        check_output(user, overwrite=True)
    with pytest.raises(DiffinspectError, match="--overwrite"):
        check_output(cold_bundle, overwrite=False, hint="pass --overwrite")
    check_output(cold_bundle, overwrite=True)  # a bundle may be replaced
    check_output(tmp_path / "new")  # so may nothing
    assert (user / "a.jpg").read_bytes() == b"precious"


# --- 9. configs and datasets ---------------------------------------------------------------------


def test_a_dataset_with_its_own_manifest_is_not_a_bundle(cold_bundle, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"images": ["a.png"], "version": 1}))
    assert is_bundle(cold_bundle) and not is_bundle(data) and not is_bundle(tmp_path / "none")


@pytest.mark.parametrize("key", ["train.lr", "train.max_minutes", "score.top_k", "data.tile_scale"])
def test_non_finite_config_numbers_are_refused(key):
    from diffinspect.config import load_config

    for value in (float("nan"), float("inf")):
        with pytest.raises(DiffinspectError, match=key):
            load_config(overrides={key: value})


def test_watch_settings_file_that_is_not_utf8_is_one_error(tmp_path):
    from diffinspect.config import load_watch_settings

    p = tmp_path / "inspect.toml"
    p.write_bytes(b"[watch]\nmodel = \"mod\xe8le\"\n")
    with pytest.raises(DiffinspectError, match="UTF-8"):
        load_watch_settings(p)


def test_cli_train_refuses_a_user_folder_before_training(capsys, line_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "train", line_dir, "--out", out, "--steps", "1")
    assert code == 2 and "--overwrite only replaces a bundle" in err
    assert os.listdir(out) == ["mine.txt"]


# --- 3. torchrun: every rank exits 0, rank 0 writes the one bundle --------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_write_one_bundle(line_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path / "ddp"
    code = "import sys; from diffinspect.cli import main; sys.argv[0] = 'inspect'; main()"
    script = tmp_path / "inspect_cli.py"
    script.write_text(code)
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), "train", str(line_dir),
                        "--out", str(out / "bundle"), "--size", "tiny", "--image-size", "32", "--steps", "4",
                        "--batch-size", "4", "--holdout", "0.3"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert os.listdir(out) == ["bundle"]
    assert Bundle.load(out / "bundle").manifest.training.steps == 4


# --- 10, 11. info names OpenVINO's INT8 kernel, the training steps and an undertrained model ----------


def test_info_shows_the_int8_kernel_the_steps_and_an_undertrained_warning(capsys, calibrated_bundle):
    code, out, _ = run_cli(capsys, "info", calibrated_bundle)
    assert code == 0
    assert "OpenVINO CPU: INT8 convolution kernel" in out and "_I8" in out
    steps = Bundle.load(calibrated_bundle).manifest.training.steps
    assert f"training: {steps} steps" in out
    assert "warning: the model trained only" in " ".join(out.split())


def test_train_threads_split_the_available_cores(monkeypatch):
    from diffinspect.train.fit import train_threads

    monkeypatch.delenv("DIFFINSPECT_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert train_threads(1) == 4 and train_threads(2) == 2 and train_threads(8) == 1
    monkeypatch.setenv("DIFFINSPECT_THREADS", "3")
    assert train_threads(2) == 3


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_devices_and_fifos_are_refused_unread(tmp_path):
    fifo = tmp_path / "cam.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(fifo, "gray")  # would block forever waiting for a writer
    if Path("/dev/zero").exists():
        with pytest.raises(ImageError, match="not a regular file"):
            read_image("/dev/zero", "gray")  # would be read forever


def test_runtime_threads_follow_a_restricted_cpu_set(monkeypatch):
    from diffinspect.engines.exports import runtime_threads

    for var in ("DIFFINSPECT_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime_threads() == 2  # a 2-core container on a 64-core host
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runtime_threads() == 0  # the whole machine: the runtime's own default


@pytest.mark.parametrize("content", ["garbage", "wrong shape"])
def test_a_bad_calibration_file_with_a_matching_sha256_is_one_error(calibrated_bundle, tmp_path, content):
    from diffinspect.scoring.loader import load_detector

    b = tmp_path / "b"
    shutil.copytree(calibrated_bundle, b)
    folder = Bundle.load(b, verify=False).folder
    target = folder / "calibration.npz"
    if content == "garbage":
        target.write_bytes(b"not an npz")
    else:
        np.savez(target, mean=np.zeros(3, np.float32), std=np.ones(3, np.float32))  # not (terms, S, S)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["calibration.npz"] = sha256_file(target)
    write_manifest(folder, m)
    with pytest.raises(DiffinspectError, match="calibration.npz"):
        load_detector(b, backend="torch")


def test_openmp_threads_sleep_only_when_the_cores_are_already_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spinning is faster alone and far slower on shared cores (bench/threads.py measures both)."""
    from diffinspect import cli
    from diffinspect.engines.exports import available_cores

    cores = available_cores()
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (cores * 0.6, 0.0, 0.0))
    assert cli._cores_busy()
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (cores * 0.4, 0.0, 0.0))
    assert not cli._cores_busy()


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_watch_refuses_a_megapixel_limit_that_is_not_a_positive_number(cold_bundle, tmp_path, capsys, value):
    cam = tmp_path / "cam"
    cam.mkdir()
    code, _, err = run_cli(capsys, "watch", cam, "--model", cold_bundle, "--out", tmp_path / "out", "--once",
                           "--quiet", "--max-megapixels", value)
    assert code == 2 and "max megapixels must be a positive number" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_station_refuses_a_port_out_of_range_in_one_line(tmp_path, capsys, port):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "station", tmp_path / "out", "--port", port)
    assert code == 2 and "--port" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "key"), [
    ("model = 5", "watch.model"), ("out = true", "watch.out"), ('batch = "x"', "watch.batch"),
    ("max_latency_ms = [1]", "watch.max_latency_ms"), ('[watch.cameras]\n"cam" = 5', "watch.cameras.cam"),
    ("cameras = 3", "watch.cameras"), ("mqtt = 1", "watch.mqtt"), ("colour = 1", "watch.colour"),
])
def test_watch_settings_of_the_wrong_type_are_one_line_naming_the_key(tmp_path, capsys, monkeypatch, text, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cam").mkdir()
    (tmp_path / "inspect.toml").write_text(f"[watch]\n{text}\n")
    code, _, err = run_cli(capsys, "watch", "cam", "--once", "--quiet")
    assert code == 2 and key in err and "inspect.toml" in err and len(err.strip().splitlines()) == 1, err


def odd_entries(folder: Path) -> set[str]:
    """A symlink loop, a dangling symlink and a FIFO, each named like a frame."""
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "dangling.png").symlink_to(folder / "nowhere.png")
    os.mkfifo(folder / "pipe.png")
    return {"loop.png", "dangling.png", "pipe.png"}


def test_score_names_every_file_it_cannot_read(cold_bundle, line_dir, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    odd = odd_entries(folder)
    for f in sorted((line_dir / "test" / "good").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    code, out, err = run_cli(capsys, "score", cold_bundle, folder, "--json")
    assert code == 0, err
    records = {Path(r["path"]).name: r for r in map(json.loads, out.splitlines())}
    assert len(records) == 5
    assert {n for n, r in records.items() if r["label"] == "error" and r["error"]} == odd


def test_watch_gives_every_unreadable_frame_a_row(cold_bundle, line_dir, tmp_path, capsys):
    cam = tmp_path / "cam"
    cam.mkdir()
    odd = odd_entries(cam)
    shutil.copy(sorted((line_dir / "test" / "good").iterdir())[0], cam / "good.png")
    code, _, err = run_cli(capsys, "watch", cam, "--model", cold_bundle, "--out", tmp_path / "out", "--once",
                           "--quiet")
    assert code == 0, err
    db = sqlite3.connect(tmp_path / "out" / "results.db")
    rows = dict(db.execute("SELECT path, status FROM frames").fetchall())
    db.close()
    assert {Path(p).name for p, s in rows.items() if s == "error"} == odd
    assert {Path(p).name for p, s in rows.items() if s != "error"} == {"good.png"}


def test_calibrate_names_a_corrupt_image_in_one_line_without_a_python_warning(line_dir, tmp_path):
    """Issue 22: calibrate on corrupt images printed a raw Python UserWarning with its source line. The skip is
    one warning line of the CLI naming the file, in the user's process (not pytest's, which captures warnings)."""
    import subprocess

    good = tmp_path / "good"
    shutil.copytree(line_dir / "train" / "good", good)
    (good / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "diffinspect", "calibrate", "--detector", "copod", str(good), "--out",
                        str(tmp_path / "b"), "--false-reject-rate", "0.1"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "zz_corrupt.png" in line]
    assert len(said) == 1 and "skipped 1 undecodable" in said[0], r.stderr
    assert "Warning:" not in r.stderr and "warnings.warn" not in r.stderr and "Traceback" not in r.stderr, r.stderr
