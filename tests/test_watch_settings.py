"""What the README promises of a station's settings, through the real CLI: a bundle per camera folder
([watch.cameras] in ./inspect.toml), the 50-megapixel limit in `watch` and `evaluate`, and the MQTT
password from the environment with QoS 2."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from line_receivers import MOSQUITTO, Broker, Subscriber, wait_for
from services import needs
from test_hardening import png_header_only, run_cli

from diffinspect.bundle import Bundle
from diffinspect.scoring.cold_start import calibrate_copod_only

BOMB = (8000, 6600)  # 52.8 MP: just over the default limit, a few bytes on disk


@pytest.fixture(scope="module")
def cold_bundles(line_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two COPOD-only bundles of the same line with different thresholds (false-reject rates)."""
    root = tmp_path_factory.mktemp("cold")
    calibrate_copod_only(line_dir / "train" / "good", root / "loose", 0.2)
    calibrate_copod_only(line_dir / "train" / "good", root / "strict", 0.05)
    return root / "loose", root / "strict"


def camera(folder: Path, line_dir: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    for f in sorted((line_dir / "test" / "good").iterdir())[:n]:
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def rows(out: Path) -> list[dict]:
    db = sqlite3.connect(out / "results.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM frames ORDER BY id")]
    finally:
        db.close()


def threshold(bundle: Path) -> float:
    return Bundle.load(bundle, verify=False).manifest.fallback.threshold


def test_a_bundle_per_camera_folder_from_inspect_toml(cold_bundles, line_dir, tmp_path, capsys, monkeypatch):
    loose, strict = cold_bundles
    assert threshold(loose) != threshold(strict)
    monkeypatch.chdir(tmp_path)
    camera(tmp_path / "feed" / "cam1", line_dir)
    camera(tmp_path / "feed" / "cam2", line_dir)
    Path("inspect.toml").write_text(f'[watch]\nmodel = "{loose}"\nout = "results"\n'
                                    f'[watch.cameras]\n"feed/cam2" = "{strict}"\n')
    code, _, err = run_cli(capsys, "watch", "feed/cam1", "feed/cam2", "--once", "--quiet")
    assert code == 0, err
    got = {(Path(r["folder"]).name, r["threshold"]) for r in rows(tmp_path / "results")}
    assert got == {("cam1", threshold(loose)), ("cam2", threshold(strict))}


def test_watch_gives_a_frame_over_50_megapixels_an_error_row(cold_bundles, line_dir, tmp_path, capsys):
    cam = camera(tmp_path / "cam", line_dir, n=2)
    (cam / "huge.png").write_bytes(png_header_only(*BOMB))
    code, _, err = run_cli(capsys, "watch", cam, "--model", cold_bundles[0], "--out", tmp_path / "out",
                           "--once", "--quiet")
    assert code == 0, err
    by_name = {Path(r["path"]).name: r for r in rows(tmp_path / "out")}
    assert len(by_name) == 3
    assert by_name["huge.png"]["status"] == "error" and "50 MP" in by_name["huge.png"]["error"]
    assert sum(r["status"] in ("ok", "ng") for r in by_name.values()) == 2


def test_evaluate_skips_an_image_over_50_megapixels_and_names_it(cold_bundles, line_dir, tmp_path, capsys):
    cat = tmp_path / "cat"
    camera(cat / "train" / "good", line_dir, n=8)
    camera(cat / "test" / "good", line_dir, n=6)
    defects = sorted(p for p in (line_dir / "test").iterdir() if p.is_dir() and p.name != "good")
    (cat / "test" / "dent").mkdir()
    for f in sorted(defects[0].iterdir())[:4]:
        (cat / "test" / "dent" / f.name).write_bytes(f.read_bytes())
    (cat / "test" / "good" / "huge.png").write_bytes(png_header_only(*BOMB))
    code, out, err = run_cli(capsys, "evaluate", cold_bundles[0], cat, "--report", tmp_path / "report")
    assert code == 0, err
    said = " ".join((out + err).split())
    assert "huge.png" in said and "50 MP" in said


@needs(MOSQUITTO is not None, "Debian's mosquitto (apt-get install mosquitto)")
def test_mqtt_password_from_the_environment_and_qos_2(cold_bundles, line_dir, tmp_path, capsys, monkeypatch):
    broker = Broker(tmp_path / "broker", users={"press-4": "s3cret"}).start()
    try:
        sub = Subscriber(broker, username="press-4", password="s3cret", qos=2)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DIFFINSPECT_MQTT_PASSWORD", "s3cret")
        camera(tmp_path / "cam", line_dir, n=5)
        # The password is in the environment only: the file holds none.
        Path("inspect.toml").write_text(f'[watch.mqtt]\nurl = "{broker.url}"\nusername = "press-4"\n'
                                        'station = "st"\nqos = 2\n')
        code, out, err = run_cli(capsys, "watch", "cam", "--model", cold_bundles[0], "--out", "res", "--once",
                                 "--quiet")
        assert code == 0, err
        assert "mqtt: 5 verdict(s) acknowledged in this run; 0 waiting" in " ".join((out + err).split())
        wait_for(lambda: len(sub.verdicts()) == 5, what="5 verdicts")
        assert sorted(m["id"] for m in sub.verdicts()) == [r["id"] for r in rows(tmp_path / "res")]
        assert {q for (t, _, _), q in zip(sub.messages, sub.qos, strict=True) if t.endswith("/verdict")} == {2}
        sub.close()
    finally:
        broker.stop()


@needs(MOSQUITTO is not None, "Debian's mosquitto (apt-get install mosquitto)")
def test_once_exits_non_zero_while_verdicts_wait_for_an_output(cold_bundles, line_dir, tmp_path, capsys,
                                                                 monkeypatch):
    broker = Broker(tmp_path / "broker", users={"press-4": "s3cret"}).start()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("DIFFINSPECT_MQTT_PASSWORD", "wrong")
        camera(tmp_path / "cam", line_dir, n=3)
        Path("inspect.toml").write_text(f'[watch.mqtt]\nurl = "{broker.url}"\nusername = "press-4"\n')
        code, _, err = run_cli(capsys, "watch", "cam", "--model", cold_bundles[0], "--out", "res", "--once",
                               "--quiet")
    finally:
        broker.stop()
    assert code == 1
    assert "verdicts not yet delivered: 3 mqtt" in " ".join(err.split())
    assert len(rows(tmp_path / "res")) == 3  # every frame scored and recorded all the same
