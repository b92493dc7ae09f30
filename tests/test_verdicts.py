"""Verdicts a quality engineer can defend: a p-value on every verdict (results.db, --json, MQTT), the
fallback's own calibration scores, and `hold` while the camera is wrong (real broker, real OPC UA server)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from line_receivers import MOSQUITTO, Broker, PlcServer, Subscriber, wait_for
from services import missing
from watch_fakes import db_rows, jsonl_rows

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.scoring.copod import SCORES_FILE
from diffinspect.scoring.inspector import Inspector
from diffinspect.scoring.record import Record
from diffinspect.store.results import ResultStore


def _row(i: int, status: str = "ok", p_value: float | None = 0.5, hold: str | None = None) -> Record:
    return Record(f"/cam/f{i}.png", status, 0.1 * i, 0.5, "copod", "copod", 1.0, None, None, folder="/cam",
                  size=i, mtime=float(i), mtime_ns=i, received_at=float(i), scored_at=float(i), p_value=p_value,
                  hold_reason=hold)


def test_results_db_of_an_older_version_takes_p_values_and_holds(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = sqlite3.connect(out / "results.db")  # the schema before p-values and hold
    old.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, folder TEXT NOT "
                "NULL, size INTEGER NOT NULL, mtime REAL NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL "
                "CHECK (status IN ('ok', 'ng', 'error')), score REAL, threshold REAL, detector TEXT, backend TEXT, "
                "latency_ms REAL, overlay TEXT, error TEXT, fallback_reason TEXT, received_at REAL NOT NULL, "
                "scored_at REAL NOT NULL, health TEXT, UNIQUE (path, size, mtime_ns))")
    for i in (1, 2, 3):
        old.execute("INSERT INTO frames (path, folder, size, mtime, mtime_ns, status, received_at, scored_at) "
                    "VALUES (?, '/cam', 1, 1, ?, 'ok', 1, 1)", (f"/cam/old{i}.png", i))
    old.execute("DELETE FROM frames WHERE id = 3")  # a later id must not reuse it
    old.commit()
    old.close()
    store = ResultStore(out)
    try:
        new = store.commit([_row(10, "ok", 0.25), _row(11, "hold", 0.75, "lighting changed")])
    finally:
        store.close()
    assert [r.id for r in new] == [4, 5]
    rows = db_rows(out)
    assert [(r["id"], r["status"], r["p_value"], r["hold_reason"]) for r in rows] == [
        (1, "ok", None, None), (2, "ok", None, None), (4, "ok", 0.25, None), (5, "hold", 0.75, "lighting changed")]
    assert [r["p_value"] for r in jsonl_rows(out)] == [None, None, 0.25, 0.75]
    with sqlite3.connect(out / "results.db") as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO frames (path, folder, size, mtime, mtime_ns, status, received_at, scored_at) "
                   "VALUES ('/x', '/', 1, 1, 1, 'maybe', 1, 1)")  # the check still refuses other statuses


@pytest.fixture(scope="module")
def copod_bundle(line_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffinspect.scoring.cold_start import calibrate_copod_only

    out = tmp_path_factory.mktemp("cold") / "copod"
    calibrate_copod_only(line_dir / "train" / "good", out, false_reject_rate=0.1)
    return out


def test_fallback_verdicts_carry_p_values_and_reject_exactly_when_p_is_at_most_alpha(copod_bundle, line_dir):
    inspector = Inspector.fallback(copod_bundle)
    b = Bundle.load(copod_bundle)
    rate = b.manifest.fallback.false_reject_rate
    assert inspector.calibration_scores is not None
    assert inspector.calibration_scores.size == b.manifest.fallback.n_calibration
    frames = [read_image(s.path, inspector.preprocess.color) for s in labelled_set(line_dir).samples]
    verdicts = inspector.inspect(frames)
    assert {v.label for v in verdicts} == {"ok", "ng"}
    assert all((v.label == "ng") == (v.p_value <= float(rate)) for v in verdicts)
    assert [v.p_value for v in Inspector.load(copod_bundle).inspect(frames)] == [v.p_value for v in verdicts]


def test_a_bundle_without_fallback_scores_still_loads_without_p_values(copod_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(copod_bundle, old)
    folder = Bundle.load(old, verify=False).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"][SCORES_FILE]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / SCORES_FILE).unlink()
    verdicts = Inspector.fallback(old).inspect([np.zeros((64, 64, 3), np.uint8)])
    assert verdicts[0].label in ("ok", "ng") and verdicts[0].p_value is None


def test_score_json_prints_the_p_value(copod_bundle, line_dir):
    paths = sorted((line_dir / "test" / "good").iterdir())[:3]
    res = subprocess.run([sys.executable, "-m", "diffinspect", "score", str(copod_bundle), *map(str, paths),
                          "--json"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(lines) == 3 and all(0 < r["p_value"] <= 1 for r in lines)


def test_the_station_says_what_the_scoring_threshold_guarantees(copod_bundle, line_dir, tmp_path):
    """The watcher publishes each detector's guarantee (the loader's, in threshold.describe_bound's words);
    the station shows the one of the detector that scored the camera's newest frame."""
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.station.app import Station

    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for p in sorted((line_dir / "test" / "good").iterdir())[:6]:
        shutil.copy(p, cam / p.name)
    run_watch([cam], out, lambda: Inspector.fallback(copod_bundle), lambda: Inspector.fallback(copod_bundle),
              WatchOptions(once=True, quiet=True, overlays="none"))
    said = Inspector.fallback(copod_bundle).guarantee
    assert said is not None and "at most 0.1 of good parts are rejected" in said
    n = Bundle.load(copod_bundle).manifest.fallback.n_calibration
    assert f"from {n} good images (split-conformal rule)" in said
    assert Station(out).state()["detector"]["guarantee"] == said


@pytest.mark.slow
def test_every_calibrated_path_rejects_exactly_when_p_is_at_most_alpha(trained_bundle, line_dir, tmp_path):
    """The diffusion path, the minp fused path and the fallback of real calibrated bundles."""
    from diffinspect.scoring.calibrate import calibrate

    frames = None
    for fusion in ("sum", "minp"):
        path = tmp_path / fusion
        shutil.copytree(trained_bundle, path)
        calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, fusion=fusion)
        for inspector in (Inspector.load(path, backend="torch"), Inspector.fallback(path)):
            if frames is None:
                frames = [read_image(s.path, inspector.preprocess.color) for s in labelled_set(line_dir).samples]
            verdicts = inspector.inspect(frames)
            assert all(v.p_value is not None for v in verdicts), (fusion, inspector.name)
            assert {v.label for v in verdicts} == {"ok", "ng"}, (fusion, inspector.name)
            assert all((v.label == "ng") == (v.p_value <= 0.1) for v in verdicts), (fusion, inspector.name)


# -- hold: verdicts of a camera whose lighting, focus or view is wrong ---------------------------------


def test_hold_is_a_watch_setting_checked_in_one_line(tmp_path: Path) -> None:
    from diffinspect import DiffinspectError
    from diffinspect.config import load_watch_settings
    from diffinspect.line.options import WatchOptions

    toml = tmp_path / "inspect.toml"
    toml.write_text('[watch]\non_alarm = "hold"\n')
    assert load_watch_settings(toml).on_alarm == "hold"
    assert WatchOptions().on_alarm == "flag"
    with pytest.raises(DiffinspectError, match="on_alarm must be flag or hold, got 'stop'"):
        WatchOptions(on_alarm="stop").validate()


def test_held_frames_are_rejected_to_manual_check_until_the_alarm_clears(tmp_path: Path) -> None:
    pytest.importorskip("asyncua")
    if MOSQUITTO is None:
        missing("Debian's mosquitto (apt-get install mosquitto)")
    from test_drift import _Steady, darker, scene

    from diffinspect.config import MqttConfig, OpcuaConfig, OpcuaNodes
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.outputs.mqtt import MqttOutput
    from diffinspect.outputs.opcua import OpcuaOutput
    from diffinspect.scoring.health import fit_health
    from diffinspect.station.app import Station

    rng = np.random.default_rng(0)
    profile = fit_health([scene(rng) for _ in range(160)], {"copod": rng.normal(0, 1, 200)})
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    t0 = 1_700_000_000
    for i in range(200):  # oldest first: as calibrated, then the light dims, then it is fixed
        f = darker(scene(rng)) if 40 <= i < 100 else scene(rng)
        cv2.imwrite(str(cam / f"f{i:03d}.png"), f)
        os.utime(cam / f"f{i:03d}.png", (t0 + i, t0 + i))
    broker = Broker(tmp_path / "broker").start()
    plc = PlcServer().start()
    rejects: dict[int, bool] = {}

    def on_write(event, dispatcher) -> None:  # noqa: ANN001
        vals = {str(w.NodeId.Identifier): w.Value.Value.Value for w in event.request_params.NodesToWrite}
        if "Vision.Counter" in vals:  # not the server's own status writes
            rejects[vals["Vision.Counter"]] = vals["Vision.Reject"]

    from asyncua.common.callback import CallbackType

    plc._server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, on_write)
    seen_by_station: list[list[dict]] = []

    def station_view(rows: list[Record]) -> None:
        if any(r.status == "hold" for r in rows) and not seen_by_station:
            seen_by_station.append(Station(out).state()["hold"])

    sub = Subscriber(broker)
    try:
        det = _Steady(profile)  # every part passes: only the hold can reject one
        outputs = [MqttOutput(MqttConfig(url=broker.url, station="st1")),
                   OpcuaOutput(OpcuaConfig(url=plc.url, nodes=OpcuaNodes(**plc.node_ids()), timeout_s=2))]
        summary = run_watch([cam], out, lambda: det, lambda: det, WatchOptions(
            once=True, quiet=True, overlays="none", on_alarm="hold"), on_commit=[station_view], outputs=outputs)
        rows = db_rows(out)
        wait_for(lambda: len(sub.verdicts()) == 200, what="200 verdicts")
        wait_for(lambda: len(rejects) == 200, what="200 PLC writes")
        messages = {m["id"]: m for m in sub.verdicts()}
        wait_for(lambda: sub.statuses()[-1:] == ["offline"], what="offline at the end")
        retained = [json.loads(p) for p in sub.on("/status")]
    finally:
        sub.close()
        broker.stop()
        plc.stop()
    with sqlite3.connect(out / "results.db") as db:
        events = db.execute("SELECT name, state FROM events ORDER BY id").fetchall()
    assert events == [("lighting changed", "raised"), ("lighting changed", "cleared")]
    statuses = "".join("h" if r["status"] == "hold" else "o" if r["status"] == "ok" else "?" for r in rows)
    # One run of held frames: from the batch after the raise up to the batch that cleared it.
    assert statuses.strip("o") == "h" * statuses.count("h") and 40 < statuses.index("h") < 100
    assert statuses.endswith("o") and summary.hold == statuses.count("h") and summary.ok + summary.hold == 200
    held = [r for r in rows if r["status"] == "hold"]
    assert all(r["hold_reason"] == "lighting changed" and r["p_value"] is None for r in held)  # _Steady: no p
    assert all(messages[r["id"]]["status"] == r["status"] for r in rows)
    assert all(messages[r["id"]]["hold_reason"] == "lighting changed" for r in held)
    assert all(rejects[r["id"]] == (r["status"] == "hold") for r in rows)  # the PLC sends held parts to check
    # The retained MQTT status: the camera held and why, with its open alarm, then released.
    held_said = [m for m in retained if m["hold"]]
    assert held_said and all(m["hold"] == {"cam": "lighting changed"} for m in held_said)
    assert any(a["name"] == "lighting changed" for m in held_said for a in m["alarms"])
    assert retained[-2]["hold"] == {} and retained[-2]["alarms"] == [] and retained[-1]["status"] == "offline"
    assert [(h["folder"], h["hold_reason"]) for h in seen_by_station[0]] == [(str(cam), "lighting changed")]
    assert Station(out).state()["hold"] == []  # cleared: the camera's newest verdict is no longer held


# -- suspects: calibration images that look defective ------------------------------------------------


def test_suspects_are_the_outliers_of_a_calibration_set_and_a_clean_set_has_none() -> None:
    from diffinspect.scoring.suspects import benjamini_hochberg, find_suspects, leave_one_out_p

    rng = np.random.default_rng(0)
    flagged_clean = [len(find_suspects(rng.normal(0, 1, 200), [str(i) for i in range(200)])) for _ in range(40)]
    assert sum(n > 0 for n in flagged_clean) <= 4  # BH at 5 % on a clean set: rarely any flag at all
    scores = np.r_[rng.gamma(2.0, 1.0, 300), 25.0, 30.0]  # skewed good scores and two defects
    found = find_suspects(scores, [f"img{i}" for i in range(302)])
    assert [s.image for s in found] == ["img301", "img300"] and found[0].p_value < found[1].p_value < 1e-4
    p = leave_one_out_p(scores)
    assert p.shape == (302,) and np.all((p > 0) & (p <= 1)) and p[:300].min() > 1e-3
    assert benjamini_hochberg(np.array([0.001, 0.02, 0.5, 0.03]), 0.05).tolist() == [True, True, False, True]


def test_calibrate_lists_a_defective_image_among_the_good_ones_and_can_exclude_it(line_dir, tmp_path):
    from diffinspect.evaluation.evaluate import _suspect_notes

    good = tmp_path / "good"
    shutil.copytree(line_dir / "train" / "good", good)
    bad = []
    for i, p in enumerate(sorted(good.iterdir())[:4]):  # a dark patch over a third of the part
        img = cv2.imread(str(p))
        img[10:40, 10:40] = 0
        cv2.imwrite(str(good / f"zz{i}.png"), img)
        bad.append(good / f"zz{i}.png")

    def run(*flags: str) -> tuple[str, dict]:
        out = tmp_path / f"b{len(flags)}"
        res = subprocess.run([sys.executable, "-m", "diffinspect", "calibrate", "--detector", "copod", str(good),
                              "--out", str(out), "--false-reject-rate", "0.1", *flags], capture_output=True,
                             text=True, env={**os.environ, "COLUMNS": "300"})
        assert res.returncode == 0, res.stderr
        return res.stdout + res.stderr, json.loads(Bundle.load(out).file("suspects.json").read_text())

    said, found = run()
    flagged = {s["image"] for s in found["suspects"]}
    assert flagged and flagged <= {str(p) for p in bad}  # only defective images, none of the good ones
    assert all(Path(f).name in said for f in flagged) and "--exclude-suspects" in said
    notes = _suspect_notes(tmp_path / "b0")
    assert all(any(f in n and "looks defective" in n for n in notes) for f in flagged)
    said, found = run("--exclude-suspects")
    assert {s["image"] for s in found["excluded"]} == flagged and "excluded" in said
    assert {s["image"] for s in found["suspects"]} <= {str(p) for p in bad} - flagged  # the split was drawn anew
    fallback = Bundle.load(tmp_path / "b1").manifest.fallback
    assert fallback.n_fit + fallback.n_calibration == 64 - len(flagged)  # fitted without them
