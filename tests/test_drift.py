"""Health signals and drift alarms on synthetic frames of a fixed camera view."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.line.drift import CLEAR_AFTER, Bag, DriftMonitor, EProcess, exceedance_bound
from diffinspect.scoring.health import HEALTH_FILE, fit_health, load_health, measure
from diffinspect.scoring.threshold import binom_sf

SIDE = 96


def scene(rng: np.random.Generator) -> np.ndarray:
    """A part in a fixture: bright plate with dark holes and an edge, placed within +-1 px, textured."""
    img = np.full((SIDE, SIDE), 70, np.float32)
    dx, dy = rng.integers(-1, 2, 2)
    cv2.rectangle(img, (14 + dx, 12 + dy), (82 + dx, 84 + dy), 170, -1)
    for cx, cy in ((30, 30), (66, 30), (48, 66)):
        cv2.circle(img, (cx + dx, cy + dy), 7, 40, -1)
    img *= rng.uniform(0.95, 1.05)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[:, :, None]


def darker(f: np.ndarray) -> np.ndarray:
    return (f.astype(np.float32) * 0.7).astype(np.uint8)


def blurred(f: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(f, (0, 0), 2.0)[:, :, None]


def shifted(f: np.ndarray) -> np.ndarray:
    # Whole pixels: a sub-pixel shift interpolates, which blurs the frame as well.
    m = np.float32([[1, 0, round(0.08 * SIDE)], [0, 1, round(0.08 * SIDE)]])
    return cv2.warpAffine(f, m, (SIDE, SIDE), borderMode=cv2.BORDER_REPLICATE)[:, :, None]


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1, 200)
    return fit_health([scene(rng) for _ in range(160)], {"copod": scores})


def feed(monitor: DriftMonitor, frames, scores=None) -> list:
    raised = []
    for i, f in enumerate(frames):
        sig = measure(f, monitor.profile.reference)
        s = None if scores is None else float(scores[i])
        raised += [(i, e) for e in monitor.update(sig, "copod", "ok" if s is not None else None, s)]
    return raised


def test_signals_follow_the_change():
    rng = np.random.default_rng(1)
    f = scene(rng)
    base = measure(f)
    assert math.isnan(base["shift"])
    assert measure(darker(f))["brightness"] < 0.75 * base["brightness"]
    assert measure(blurred(f))["sharpness"] < base["sharpness"] - 0.5
    # Sharpness is gain-free: a darker frame is not a blurred one.
    assert abs(measure(darker(f))["sharpness"] - base["sharpness"]) < 0.1


def test_unchanged_frames_raise_nothing(profile):
    rng = np.random.default_rng(2)
    mon = DriftMonitor(profile)
    assert feed(mon, [scene(rng) for _ in range(200)], rng.normal(0, 1, 200)) == []


@pytest.mark.parametrize(("change", "kind"), [(darker, "lighting"), (blurred, "focus"), (shifted, "camera")])
def test_changes_raise_their_named_alarm_within_50_frames(profile, change, kind):
    rng = np.random.default_rng(3)
    mon = DriftMonitor(profile)
    assert feed(mon, [scene(rng) for _ in range(60)]) == []
    events = feed(mon, [change(scene(rng)) for _ in range(50)])
    raised = {e.kind: i for i, e in events if e.state == "raised"}
    assert set(raised) == {kind}, events  # its own alarm, and no other
    assert raised[kind] < 50
    assert mon.open[kind].name == {"lighting": "lighting changed", "focus": "out of focus",
                                   "camera": "camera moved"}[kind]


def test_a_raised_alarm_holds_while_the_change_lasts_then_clears(profile):
    rng = np.random.default_rng(9)
    mon = DriftMonitor(profile)
    assert feed(mon, [scene(rng) for _ in range(40)]) == []
    dark = feed(mon, [darker(scene(rng)) for _ in range(150)])
    assert [(e.kind, e.state) for _, e in dark] == [("lighting", "raised")]  # raised once, held
    back = feed(mon, [scene(rng) for _ in range(100)])
    assert [(e.kind, e.state) for _, e in back] == [("lighting", "cleared")]
    assert 0 < back[0][0] < CLEAR_AFTER and mon.open == {}  # 50 frames after its last crossing


def test_score_drift_raises_then_clears_with_hysteresis(profile):
    rng = np.random.default_rng(4)
    mon = DriftMonitor(profile)
    q = float(np.quantile(profile.scores["copod"], 0.8))
    for _ in range(30):  # OK parts within the calibrated distribution
        assert mon.update(None, "copod", "ok", float(rng.normal(0, 1))) == []
    raised = [e for _ in range(50) for e in mon.update(None, "copod", "ok", q + 0.5)]
    assert [e.name for e in raised] == ["score drift: re-calibrate"]
    cleared = [e for _ in range(100) for e in mon.update(None, "copod", "ok", float(rng.normal(0, 1)))]
    assert [e.state for e in cleared] == ["cleared"]
    # NG parts and other detectors' scores do not count.
    assert [e for _ in range(60) for e in mon.update(None, "copod", "ng", q + 9)] == []
    assert [e for _ in range(60) for e in mon.update(None, "diffusion", "ok", q + 9)] == []


def test_statistics():
    assert binom_sf(0, 10, 0.3) == 1.0
    assert binom_sf(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binom_sf(2, 3, 0.5) == pytest.approx(0.5)
    # The bound on the exceedance rate of the r-th largest of n is above its mean r/(n+1).
    b = exceedance_bound(20, 199)
    assert 20 / 200 < b < 0.2
    # Conformal p-values against the calibration values and every value learnt since: uniform on good
    # frames, ties (a signal with few values) broken at random.
    rng = np.random.default_rng(0)
    for draw in (lambda k: rng.normal(size=k), lambda k: rng.integers(-2, 3, k).astype(float)):
        bag = Bag(draw(300))
        p = []
        for v in draw(3000):
            p.append(bag.p_low(float(v), rng.random()))
            bag.add(float(v))
        p = np.array(p)
        assert bag.n == 3300
        for level in (0.01, 0.05, 0.2, 0.5):
            assert abs(np.mean(p <= level) - level) < 4 * math.sqrt(level * (1 - level) / p.size)
    assert Bag(np.arange(100.0)).p_low(-50.0, 0.5) == pytest.approx(0.5 / 101)
    # An e-process starts at 1, stays low on events as likely as their bounds, grows on likelier ones.
    proc = EProcess([0.05, 0.5])
    assert proc.value == 1.0
    for u in rng.uniform(size=300):
        proc.update(np.array([u <= 0.05, u <= 0.5]))
    assert proc.value < 20
    for u in rng.uniform(size=40) ** 3:
        proc.update(np.array([u <= 0.05, u <= 0.5]))
    assert proc.value > 1e4


def test_false_alarms_ever_stay_below_one_over_t_over_calibration_draws():
    """P(the e-process ever reaches T) <= 1 / T, over calibration sets and streams together."""
    rng = np.random.default_rng(7)
    streams, t, levels = 300, 20.0, (0.02, 0.05, 0.2, 0.5)
    crossed = 0
    for _ in range(streams):
        bag, proc = Bag(rng.normal(size=60)), EProcess([*levels, *levels])
        for v in rng.normal(size=300):
            p = bag.p_low(float(v), rng.random())
            bag.add(float(v))
            proc.update(np.array([p <= a for a in levels] + [1 - p <= a for a in levels]))
            if proc.value >= t:
                crossed += 1
                break
    assert crossed / streams <= 1 / t


def test_a_long_unchanged_stream_raises_nothing(profile):
    """Frames resampled from the calibration frames' own signal values, 20,000 of them."""
    rng = np.random.default_rng(8)
    mon = DriftMonitor(profile)
    n = profile.values["brightness"].size
    raised = []
    for i in rng.integers(0, n, 20_000):
        sig = {k: float(v[i]) for k, v in profile.values.items()}
        raised += mon.update(sig, "copod", "ok", float(rng.choice(profile.scores["copod"])))
    assert raised == [] and mon.open == {}


def test_cold_start_bundle_records_health(tmp_path: Path):
    from diffinspect.bundle import Bundle
    from diffinspect.scoring.cold_start import calibrate_copod_only
    from diffinspect.scoring.loader import load_fallback

    rng = np.random.default_rng(5)
    good = tmp_path / "good"
    good.mkdir()
    for i in range(140):
        cv2.imwrite(str(good / f"g{i:03d}.png"), scene(rng))
    calibrate_copod_only(good, tmp_path / "b", 0.05)
    b = Bundle.load(tmp_path / "b")
    assert HEALTH_FILE in b.manifest.files and b.manifest.health is not None
    assert set(b.manifest.health.bands) >= {"brightness", "contrast", "sharpness"}
    assert b.manifest.health.score_quantile["copod"].level == 0.8
    p = load_health(b)
    assert p is not None and p.values["brightness"].size == 140
    assert load_fallback(b).health is not None
    # A bundle without the section still loads, with no health profile.
    b.manifest.health = None
    assert load_health(b) is None


def test_results_db_migrates_and_stores_events(tmp_path: Path):
    from watch_fakes import db_rows

    from diffinspect.scoring.record import Record
    from diffinspect.store.results import ResultStore

    out = tmp_path / "out"
    out.mkdir()
    old = sqlite3.connect(out / "results.db")
    old.execute("CREATE TABLE frames (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, folder TEXT NOT "
                "NULL, size INTEGER NOT NULL, mtime REAL NOT NULL, mtime_ns INTEGER NOT NULL, status TEXT NOT NULL, "
                "score REAL, threshold REAL, detector TEXT, backend TEXT, latency_ms REAL, overlay TEXT, error TEXT, "
                "fallback_reason TEXT, received_at REAL NOT NULL, scored_at REAL NOT NULL, UNIQUE (path, size, "
                "mtime_ns))")
    old.execute("INSERT INTO frames (path, folder, size, mtime, mtime_ns, status, received_at, scored_at) "
                "VALUES ('/a.png', '/', 1, 1, 1, 'error', 1, 1)")
    old.commit()
    old.close()
    store = ResultStore(out)
    try:
        store.commit([Record("/b.png", "ok", 0.1, 0.5, "copod", "copod", 3.0, None, None, folder="/", size=2,
                             mtime=2.0, mtime_ns=2, received_at=2.0, scored_at=2.0,
                             health=json.dumps({"brightness": 100.0}))])
        store.add_events([(3.0, "lighting", "lighting changed", "raised", "brightness 70", "/cam")])
    finally:
        store.close()
    rows = db_rows(out)
    assert rows[0]["health"] is None and json.loads(rows[1]["health"]) == {"brightness": 100.0}
    db = sqlite3.connect(out / "results.db")
    assert db.execute("SELECT kind, name, state, folder FROM events").fetchall() == [
        ("lighting", "lighting changed", "raised", "/cam")]
    db.close()


class _Steady:
    """A detector that passes every part, carrying a health profile as loaded detectors do."""

    name, backend, threshold, pixel_threshold = "copod", "fake", 1.0, None

    def __init__(self, profile) -> None:  # noqa: ANN001
        from diffinspect.data.image import Preprocess

        self.preprocess = Preprocess(color="gray")
        self.health = profile

    def score(self, frames):  # noqa: ANN001, ANN201
        from diffinspect.scoring.detector import Scored

        return Scored(scores=np.zeros(len(frames)), maps=None)


def test_watch_stores_health_and_alarms(tmp_path: Path, profile, caplog: pytest.LogCaptureFixture):
    import os

    from watch_fakes import db_rows

    from diffinspect.line.watch import WatchOptions, run_watch


    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    rng = np.random.default_rng(6)
    t0 = 1_700_000_000
    for i in range(100):  # oldest first: 40 as calibrated, then the light dims
        f = scene(rng) if i < 40 else darker(scene(rng))
        p = cam / f"f{i:03d}.png"
        cv2.imwrite(str(p), f)
        os.utime(p, (t0 + i, t0 + i))
    det = _Steady(profile)
    run_watch([cam], out, lambda: det, lambda: det, WatchOptions(once=True, quiet=True, overlays="none"))
    rows = db_rows(out)
    assert len(rows) == 100 and all(json.loads(r["health"])["brightness"] > 0 for r in rows)
    db = sqlite3.connect(out / "results.db")
    events = db.execute("SELECT name, state, folder FROM events").fetchall()
    db.close()
    assert events == [("lighting changed", "raised", str(cam))]  # that alarm only, raised once
    said = [m for m in caplog.messages if m.startswith("ALARM")]  # a warning: shown at the default level
    assert len(said) == 1 and said[0].startswith(f"ALARM lighting changed: raised on {cam} (")
    assert "brightness" in json.loads((out / "station.json").read_text())["bands"]


def test_alarm_lambda_is_a_checked_watch_setting_the_alarms_use(tmp_path: Path, profile):
    import os

    from diffinspect.config import load_watch_settings
    from diffinspect.line.watch import WatchOptions, run_watch

    toml = tmp_path / "inspect.toml"
    assert load_watch_settings(toml).alarm_lambda == 1000 == WatchOptions().alarm_lambda
    toml.write_text("[watch]\nalarm_lambda = 1e9\n")
    assert load_watch_settings(toml).alarm_lambda == 1e9
    for bad, shown in (("1", "got 1.0"), ("0.5", "got 0.5"), ('"x"', "must be a finite number")):
        toml.write_text(f"[watch]\nalarm_lambda = {bad}\n")
        with pytest.raises(DiffinspectError, match=f"watch.alarm_lambda.*{shown}"):
            load_watch_settings(toml)
    with pytest.raises(DiffinspectError, match="alarm_lambda must be a number above 1"):
        WatchOptions(alarm_lambda=float("nan")).validate()
    cam = tmp_path / "cam"
    cam.mkdir()
    rng = np.random.default_rng(6)
    for i in range(100):  # 40 frames as calibrated, then the light dims
        p = cam / f"f{i:03d}.png"
        cv2.imwrite(str(p), scene(rng) if i < 40 else darker(scene(rng)))
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
    det = _Steady(profile)
    details = []
    for lam in (1000.0, 1e9):
        out = tmp_path / f"out{lam:g}"
        run_watch([cam], out, lambda: det, lambda: det,
                  WatchOptions(once=True, quiet=True, overlays="none", alarm_lambda=lam))
        with sqlite3.connect(out / "results.db") as db:
            details += [d for (d,) in db.execute("SELECT detail FROM events WHERE state = 'raised'")]
    assert len(details) == 2 and "false alarm rate 1/1000)" in details[0] and "1/1e+09)" in details[1]


@pytest.mark.slow
def test_diffusion_calibration_records_health_for_both_detectors(calibrated_bundle):
    from diffinspect.bundle import Bundle
    from diffinspect.scoring.loader import load_detector

    b = Bundle.load(calibrated_bundle)
    assert set(b.manifest.health.score_quantile) == {"diffusion", "copod"}
    assert load_detector(b, backend="torch").health is not None
