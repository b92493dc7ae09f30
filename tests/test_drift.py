"""Health signals and drift alarms on synthetic frames of a fixed camera view."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffinspect import DiffinspectError
from diffinspect.data.image import decode_image
from diffinspect.line.drift import CLEAR_AFTER, Bag, DriftMonitor, EProcess, exceedance_bound
from diffinspect.scoring.health import HEALTH_FILE, HealthProfile, fit_health, load_health, measure
from diffinspect.scoring.threshold import binom_sf

SIDE = 96
NATIVE = 4  # a native frame of NATIVE x SIDE px a side is read at SIDE: decoded at 1/4, as watch reads 5 MP


def scene(rng: np.random.Generator, k: int = 1) -> np.ndarray:
    """A part in a fixture: bright plate with dark holes and an edge, placed within +-1 px (at SIDE),
    textured; k: drawn at k times that size, the placement to the native pixel, the texture per native pixel."""
    img = np.full((SIDE * k, SIDE * k), 70, np.float32)
    dx, dy = rng.integers(-k, k + 1, 2)
    cv2.rectangle(img, (14 * k + dx, 12 * k + dy), (82 * k + dx, 84 * k + dy), 170, -1)
    for cx, cy in ((30, 30), (66, 30), (48, 66)):
        cv2.circle(img, (cx * k + dx, cy * k + dy), 7 * k, 40, -1)
    img *= rng.uniform(0.95, 1.05)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[:, :, None]


def darker(f: np.ndarray) -> np.ndarray:
    return (f.astype(np.float32) * 0.7).astype(np.uint8)


def blurred(f: np.ndarray) -> np.ndarray:
    """Out of focus by 2 px of the frame's own (native) pixels."""
    return cv2.GaussianBlur(f, (0, 0), 2.0)[:, :, None]


def shifted(f: np.ndarray) -> np.ndarray:
    # Whole pixels: a sub-pixel shift interpolates, which blurs the frame as well.
    side = f.shape[0]
    m = np.float32([[1, 0, round(0.08 * side)], [0, 1, round(0.08 * side)]])
    return cv2.warpAffine(f, m, (side, side), borderMode=cv2.BORDER_REPLICATE)[:, :, None]


def read_jpeg(frame: np.ndarray) -> np.ndarray:
    """The frame as `inspect watch` reads a camera's JPEG of it where the profile was fitted at SIDE:
    decoded reduced by the DCT."""
    data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    return decode_image(data, "gray", min_side=SIDE)


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1, 200)
    return fit_health([scene(rng) for _ in range(160)], {"copod": scores})


@dataclass
class Line:
    """A camera's frames and how they are read, with the profile calibrated so."""

    profile: HealthProfile
    frame: Callable[[np.ndarray], np.ndarray]  # a frame as the camera takes it (native size)
    read: Callable[[np.ndarray], np.ndarray]  # that frame as watch reads it


@pytest.fixture(scope="module", params=["whole", "reduced"])
def line(request, profile) -> Line:  # noqa: ANN001
    """whole: frames read as they are, the profile fitted on them. reduced: frames NATIVE times larger,
    calibrated on lossless frames (area-averaged to SIDE by fit_health) and read from JPEG at SIDE (the
    DCT-reduced decode), so a PNG calibration set and a JPEG line meet."""
    if request.param == "whole":
        return Line(profile, scene, lambda f: f)
    rng = np.random.default_rng(0)
    big = partial(scene, k=NATIVE)
    return Line(fit_health([big(rng) for _ in range(160)], read_side=SIDE), big, read_jpeg)


def feed(monitor: DriftMonitor, frames, scores=None, read=lambda f: f) -> list:  # noqa: ANN001
    raised = []
    for i, f in enumerate(frames):
        sig = measure(read(f), monitor.profile.reference)
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


def test_unchanged_frames_raise_nothing(line: Line):
    rng = np.random.default_rng(2)
    mon = DriftMonitor(line.profile)
    assert feed(mon, [line.frame(rng) for _ in range(200)], rng.normal(0, 1, 200), line.read) == []


@pytest.mark.parametrize(("change", "kind"), [(darker, "lighting"), (blurred, "focus"), (shifted, "camera")])
def test_changes_raise_their_named_alarm_within_50_frames(line: Line, change, kind):
    rng = np.random.default_rng(3)
    mon = DriftMonitor(line.profile)
    assert feed(mon, [line.frame(rng) for _ in range(60)], read=line.read) == []
    events = feed(mon, [change(line.frame(rng)) for _ in range(50)], read=line.read)
    raised = {e.kind: i for i, e in events if e.state == "raised"}
    assert set(raised) == {kind}, events  # its own alarm, and no other
    assert raised[kind] < 50
    assert mon.open[kind].name == {"lighting": "lighting changed", "focus": "out of focus",
                                   "camera": "camera moved"}[kind]


def test_a_raised_alarm_holds_while_the_change_lasts_then_clears(line: Line):
    rng = np.random.default_rng(9)
    mon = DriftMonitor(line.profile)
    assert feed(mon, [line.frame(rng) for _ in range(40)], read=line.read) == []
    dark = feed(mon, [darker(line.frame(rng)) for _ in range(150)], read=line.read)
    assert [(e.kind, e.state) for _, e in dark] == [("lighting", "raised")]  # raised once, held
    back = feed(mon, [line.frame(rng) for _ in range(100)], read=line.read)
    assert [(e.kind, e.state) for _, e in back] == [("lighting", "cleared")]
    assert 0 < back[0][0] < CLEAR_AFTER and mon.open == {}  # 50 frames after its last crossing


def test_a_jpeg_decoded_reduced_reads_as_the_frame_area_averaged():
    """The DCT-reduced decode of the line and the area-averaged frames a lossless calibration set gives
    read alike: each signal's mean over the same frames within a third of the good frames' own spread."""
    rng = np.random.default_rng(10)
    frames = [scene(rng, NATIVE) for _ in range(60)]
    prof = fit_health(frames, read_side=SIDE)
    dct = [measure(read_jpeg(f), prof.reference) for f in frames]
    assert read_jpeg(frames[0]).shape == (SIDE, SIDE, 1)
    for name in ("brightness", "contrast", "sharpness", "offset_x", "offset_y"):
        area, spread = prof.values[name], prof.values[name].std()
        assert spread > 0
        assert abs(np.mean([d[name] for d in dct]) - area.mean()) < spread / 3, name


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
    # Fitted at the scale watch reads the frames at, and says so.
    rule = b.manifest.preprocess.read_side(b.manifest.fallback.feature_size)
    assert p.read_side == b.manifest.health.read_side == rule == 256
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

    def __init__(self, profile, preprocess=None) -> None:  # noqa: ANN001
        from diffinspect.data.image import Preprocess

        self.preprocess = preprocess or Preprocess(color="gray")
        self.health = profile
        self.shapes: list[tuple[int, ...]] = []  # of the frames it scored, as decoded

    def score(self, frames):  # noqa: ANN001, ANN201
        from diffinspect.scoring.detector import Scored

        self.shapes += [f.shape for f in frames]
        return Scored(scores=np.zeros(len(frames)), maps=None)


def test_frames_are_decoded_reduced_where_the_health_profile_was_fitted_so(profile):
    """The decode scale of a lane (Supervisor.decode_side): Preprocess.read_side, with a health profile
    only where the profile was fitted at that scale; whole for an older profile, tiles and an ROI."""
    from diffinspect.data.image import Preprocess
    from diffinspect.line.say import WarnOnce
    from diffinspect.line.supervisor import Supervisor
    from diffinspect.line.watch import WatchOptions

    def side(health, **prep) -> int | None:  # noqa: ANN001
        det = _Steady(health, Preprocess(color="gray", **prep))
        sup = Supervisor(lambda: det, lambda: det, WatchOptions(), WarnOnce())
        sup.start()
        return sup.decode_side

    rule = Preprocess(color="gray").read_side(128)
    assert rule == 256 == Preprocess(color="gray", image_size=(96, 128)).read_side(64)
    assert side(None) == rule
    assert side(replace(profile, read_side=rule)) == rule
    assert side(profile) is None and profile.read_side is None  # fitted whole (as every older profile)
    assert side(replace(profile, read_side=rule // 2)) is None  # fitted at another scale
    assert side(None, feed="tiles") is None and side(None, roi=(0, 0, 50, 50)) is None
    assert Preprocess(color="gray", feed="tiles").read_side(128) is None


def test_watch_with_drift_alarms_decodes_a_5_mp_jpeg_reduced(tmp_path: Path, profile):
    """A 5 MP JPEG and the same frame as PNG, with a health profile fitted at the read scale: both reach
    scoring and health at 1/4 of their size; with an older profile (fitted whole) the JPEG is decoded whole."""
    from watch_fakes import db_rows

    from diffinspect.data.image import Preprocess
    from diffinspect.line.watch import WatchOptions, run_watch

    frame = cv2.resize(scene(np.random.default_rng(11)), (2592, 1944), interpolation=cv2.INTER_CUBIC)
    rule = Preprocess(color="gray").read_side(128)
    for fmt, read_side, decoded in (("jpg", rule, (486, 648, 1)), ("png", rule, (486, 648, 1)),
                                    ("jpg", None, (1944, 2592, 1))):
        cam, out = tmp_path / f"cam-{fmt}-{read_side}", tmp_path / f"out-{fmt}-{read_side}"
        cam.mkdir()
        cv2.imwrite(str(cam / f"f.{fmt}"), frame)
        det = _Steady(replace(profile, read_side=read_side))
        run_watch([cam], out, lambda d=det: d, lambda d=det: d, WatchOptions(once=True, quiet=True, overlays="none"))
        assert det.shapes == [decoded], (fmt, read_side)
        assert json.loads(db_rows(out)[0]["health"])["brightness"] > 0


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
    health = load_detector(b, backend="torch").health
    assert health is not None
    assert health.read_side == b.manifest.preprocess.read_side(b.manifest.fallback.feature_size) is not None
