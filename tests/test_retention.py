"""Retention of `inspect watch`: rows archived by day only once delivered, the daily mirror, our files
within the disk budget, and a small filesystem that really fills (a tmpfs mounted for the test)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from line_receivers import MOSQUITTO, frame_row
from services import needs
from watch_fakes import MARKER, MARKER_ROWS, Factory, db_rows, jsonl_rows, wait_for

import diffinspect.store.results as results_mod
import diffinspect.store.retention as retention_mod
from diffinspect import DiffinspectError
from diffinspect.config import RetentionSettings, load_watch_settings
from diffinspect.line.retention import GB, Retention, Space
from diffinspect.line.say import WarnOnce
from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.store.deliveries import Deliveries
from diffinspect.store.reader import ResultsReader
from diffinspect.store.results import ResultStore

DAY = 86400.0


def _commit_days(store: ResultStore, days_ago: list[float], per_day: int) -> None:
    i = 0
    for ago in days_ago:
        rows = []
        for _ in range(per_day):
            r = frame_row(i)
            r.scored_at = time.time() - ago * DAY + i  # a second apart, in id order
            rows.append(r)
            i += 1
        store.commit(rows)


def _archived(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in gzip.open(p, "rt")]
            for p in sorted((out / "archive").glob("*.jsonl.gz"))}


def _retire_all(store: ResultStore, marks: list[str], days: float = 90) -> int:
    n = 0
    while k := store.retire(time.time() - days * DAY, marks, limit=3):  # small steps: several per day
        n += k
    return n


def test_rows_leave_for_a_daily_archive_only_once_every_output_acknowledged(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    try:
        _commit_days(store, [120, 100, 10], per_day=5)  # ids 1-5, 6-10 old; 11-15 recent
        with Deliveries(store.db_path) as d:
            d.start_marks({"mqtt": "frames", "opcua": "frames"}, replay=True)
            d.move_mark("mqtt", 15)
            d.move_mark("opcua", 7)
        assert _retire_all(store, ["mqtt", "opcua"]) == 7  # opcua has acknowledged only up to id 7
        assert [r["id"] for r in db_rows(tmp_path)] == list(range(8, 16))
        with Deliveries(store.db_path) as d:
            d.move_mark("opcua", 15)
        assert _retire_all(store, ["mqtt", "opcua"]) == 3
        assert [r["id"] for r in db_rows(tmp_path)] == list(range(11, 16))  # recent rows stay
        archived = _archived(tmp_path)
        assert len(archived) == 2  # one file per day
        assert [r["id"] for rows in archived.values() for r in rows] == list(range(1, 11))
        assert all(r["path"] and r["status"] in ("ok", "ng") for rows in archived.values() for r in rows)
        # Readable without diffinspect: the steps' gzip members make one stream zcat reads whole.
        first = sorted((tmp_path / "archive").iterdir())[0]
        text = subprocess.run(["gzip", "-dc", str(first)], capture_output=True, check=True, text=True).stdout
        assert len(text.splitlines()) == 5
        # New rows go on after the deleted ids, and a restart mirrors nothing again.
        store.commit([frame_row(99)])
        assert db_rows(tmp_path)[-1]["id"] == 16
    finally:
        store.close()
    again = ResultStore(tmp_path)
    try:
        assert again.reconciled == 0
    finally:
        again.close()


def test_without_outputs_rows_go_by_age_alone(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    try:
        _commit_days(store, [100, 1], per_day=4)
        assert _retire_all(store, []) == 4
        kept = db_rows(tmp_path)
        assert len(kept) == 4
    finally:
        store.close()
    # The station's per-second summary leaves with the rows: it counts exactly the frames kept.
    with sqlite3.connect(tmp_path / "results.db") as db:
        assert db.execute("SELECT SUM(ok + ng + error + hold), MIN(first_id) FROM seconds").fetchone() == (
            4, min(r["id"] for r in kept))


def test_an_archive_step_costs_the_same_however_many_seconds_are_kept(tmp_path: Path) -> None:
    """A step drops the per-second summary of the rows it archived by a range of its key: a plant's months of
    kept seconds (one row each) do not slow the step, which holds the lock the commits wait for."""
    cost = {}
    for kept in (2_000, 40_000):
        store = ResultStore(tmp_path / str(kept))
        _commit_days(store, [100], per_day=100)
        now, kept_rows = time.time(), [frame_row(100 + i) for i in range(kept)]
        for i, r in enumerate(kept_rows):  # the kept rows, one a second up to now
            r.scored_at = now - kept + i
        store.commit(kept_rows)
        steps = [0]
        store._db.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1), 100)  # noqa: B023
        assert store.retire(time.time() - 90 * DAY, []) == 100
        store._db.set_progress_handler(None, 0)
        left = store._db.execute("SELECT COUNT(*), SUM(ok + ng + error + hold) FROM seconds").fetchone()
        assert left == (kept, kept)
        cost[kept] = steps[0]
        store.close()
    assert cost[40_000] <= cost[2_000] * 1.1 + 5, cost


def test_a_crash_mid_archive_neither_loses_nor_duplicates_a_row(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    store = ResultStore(tmp_path)
    real = retention_mod._append
    crashes = iter([True, False, False, True])

    def crashing(path: Path, durable: int, data: bytes) -> int:
        size = real(path, durable, data)  # the member is on disk...
        if next(crashes, False):
            raise OSError("killed before the rows were deleted (fake)")  # ...but its rows were not deleted
        return size

    monkeypatch.setattr(retention_mod, "_append", crashing)
    try:
        _commit_days(store, [100], per_day=10)
        done = 0
        for _ in range(20):
            try:
                done += store.retire(time.time() - 90 * DAY, [], limit=3)
            except OSError:
                continue
        assert done == 10
        assert db_rows(tmp_path) == []
        ids = [r["id"] for rows in _archived(tmp_path).values() for r in rows]
        assert ids == list(range(1, 11))
    finally:
        store.close()


def test_the_mirror_rotates_daily_and_a_restart_writes_only_what_is_missing(tmp_path: Path,
                                                                            monkeypatch) -> None:  # noqa: ANN001
    today = ["2026-01-01"]
    monkeypatch.setattr(results_mod, "day_of", lambda t: today[0])
    store = ResultStore(tmp_path)
    try:
        store.commit([frame_row(i) for i in range(3)])
        today[0] = "2026-01-02"
        store.commit([frame_row(i) for i in range(3, 5)])
        assert [r["id"] for r in jsonl_rows(tmp_path)] == [4, 5]
        rotated = tmp_path / "results-2026-01-01.jsonl"
        assert len(rotated.read_text().splitlines()) == 3
    finally:
        store.close()
    # A crash right after the rotation: no results.jsonl. The restart writes the rows after the rotated
    # day's, not the whole table again.
    (tmp_path / "results.jsonl").unlink()
    again = ResultStore(tmp_path)
    try:
        assert again.reconciled == 2
        assert [r["id"] for r in jsonl_rows(tmp_path)] == [4, 5]
    finally:
        again.close()


def test_a_rotated_mirror_goes_once_its_rows_are_archived(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    store = ResultStore(tmp_path)
    try:
        _commit_days(store, [100], per_day=3)
        old = tmp_path / f"results-{retention_mod.day_of(time.time() - 100 * DAY)}.jsonl"
        os.replace(tmp_path / "results.jsonl", old)  # as the rotation left it on that day
        keep = tmp_path / f"results-{retention_mod.day_of(time.time())}.jsonl"
        keep.write_text("")
        assert old.exists()
        _retire_all(store, [])
        assert not old.exists() and keep.exists()
    finally:
        store.close()


def _files(out: Path, n: int, size: int = 10_000) -> list[Path]:
    made = []
    for i in range(n):
        sub = out / ("overlays" if i % 2 else "ng")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"f{i:03d}.png"
        p.write_bytes(b"x" * size)
        os.utime(p, ns=(i * 10**9, (1_000_000 + i) * 10**9))
        made.append(p)
    return made


def test_overlays_and_moved_frames_stay_within_the_budget_oldest_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    made = _files(out, 10)
    theirs = out / "notes.png"  # not ours: never deleted, nor anything outside OUT's own folders
    theirs.write_bytes(b"y" * 50_000)
    store = ResultStore(out)
    try:
        settings = RetentionSettings(disk_gb=35_000 / GB, min_free_gb=0)
        warn_once = WarnOnce()
        ret = Retention(store, out, settings, [], Space(out, 0, store, warn_once), warn_once)
        ret._list()
        late = out / "overlays" / "late.png"
        late.write_bytes(b"z" * 10_000)
        ret.wrote(late)
        ret.run_once()
        assert [p.exists() for p in made] == [False] * 8 + [True] * 2
        assert late.exists() and theirs.exists()
        assert ret.deleted == 8
    finally:
        store.close()


def test_retention_settings_are_checked_in_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "inspect.toml"
    toml.write_text("[watch.retention]\ndays = 30\ndisk_gb = 20\nmin_free_gb = 2\n")
    r = load_watch_settings(toml).retention
    assert (r.days, r.disk_gb, r.min_free_gb) == (30, 20, 2)
    assert load_watch_settings(tmp_path / "none.toml").retention.days == 90
    for bad, says in [("days = 0", "watch.retention.days must be positive"),
                      ('disk_gb = "a lot"', "watch.retention.disk_gb must be a finite number"),
                      ("min_free_gb = -1", "watch.retention.min_free_gb cannot be negative"),
                      ("keep = 3", "unknown config key: watch.retention.keep")]:
        toml.write_text(f"[watch.retention]\n{bad}\n")
        with pytest.raises(DiffinspectError, match=says):
            load_watch_settings(toml)
    with pytest.raises(DiffinspectError, match="retention.interval_s"):
        WatchOptions(retention=RetentionSettings(interval_s=0)).validate()


# -- a filesystem that really fills ------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path: Path):  # noqa: ANN201
    """An 8 MB tmpfs (needs root and mount(8))."""
    d = tmp_path / "small"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no small filesystem for the full-disk tests: cannot run mount ({exc})")
    if r.returncode != 0:
        pytest.skip(f"no small filesystem for the full-disk tests: mount failed ({r.stderr.strip()})")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def _noise_frames(folder: Path, n: int, start: int = 0, side: int = 96) -> None:
    """Frames that do not compress: each takes about side² bytes, and so does its overlay."""
    rng = np.random.default_rng(start)
    folder.mkdir(exist_ok=True)
    for i in range(start, start + n):
        img = rng.integers(0, 200, (side, side), np.uint8)
        img[-MARKER_ROWS:] = MARKER  # the fakes' completeness marker
        ok, buf = cv2.imencode(".png", img)
        tmp = folder / f".f{i:04d}.tmp"
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, folder / f"f{i:04d}.png")


def _fill(path: Path, leave: int) -> None:
    """A file not ours that leaves `leave` bytes free on path's filesystem."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _opts(**kw: object) -> WatchOptions:
    base: dict = dict(quiet=True, stable_ms=50, settle_ms=200, rescan_seconds=0.2, overlays="all", after="move")
    base.update(kw)
    return WatchOptions(**base)


def _start(cam: Path, out: Path, opts: WatchOptions) -> tuple[threading.Thread, threading.Event, dict]:
    stop = threading.Event()
    opts.stop = stop
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(s=run_watch([cam], out, Factory(), Factory(name="copod"), opts)))
    t.start()
    return t, stop, box


def test_below_the_floor_rows_are_recorded_without_overlays_or_moves_and_it_resumes(
        small_fs: Path, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.INFO, logger="diffinspect")
    cam, out = tmp_path / "cam", small_fs / "out"
    out.mkdir()
    filler = small_fs / "filler"  # another program's file on the same disk
    _fill(filler, leave=1 << 20)
    floor = 2 / 1024  # 2 MB
    cam.mkdir()
    t, stop, _ = _start(cam, out, _opts(retention=RetentionSettings(min_free_gb=floor, interval_s=0.1)))
    try:
        _noise_frames(cam, 40)
        wait_for(lambda: len(_rows(out)) == 40, 30)
        assert all(r["overlay"] is None for r in _rows(out))
        assert len(list(cam.glob("*.png"))) == 40  # not moved: a copy across filesystems takes space
        assert not list((out / "overlays").glob("*"))
        alarms = _events(out)
        assert [(e["kind"], e["state"]) for e in alarms] == [("disk", "raised")]
        filler.unlink()  # space returns
        _noise_frames(cam, 10, start=100)
        wait_for(lambda: len(_rows(out)) == 50, 30)
        wait_for(lambda: [e["state"] for e in _events(out)] == ["raised", "cleared"], 10)
        assert all(r["overlay"] and Path(r["overlay"]).exists() for r in _rows(out)[40:])
        assert not list(cam.glob("f01*.png"))  # the new frames were moved
    finally:
        stop.set()
        t.join(60)
    said = [r.getMessage() for r in caplog.records]
    assert sum("below min_free_gb" in m for m in said) == 1 and sum("resumed" in m for m in said) == 1


def test_a_line_on_a_small_disk_trims_our_oldest_files_and_records_every_row(small_fs: Path,
                                                                             tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", small_fs / "out"
    cam.mkdir()
    floor = 3 / 1024
    t, stop, _ = _start(cam, out, _opts(batch=4, retention=RetentionSettings(min_free_gb=floor, interval_s=0.05)))
    try:
        for k in range(6):  # about 60 KB per frame (frame + overlay): four times what the disk holds
            _noise_frames(cam, 40, start=40 * k, side=160)
            wait_for(lambda k=k: len(_rows(out)) == 40 * (k + 1), 60)
    finally:
        stop.set()
        t.join(60)
    rows = _rows(out)
    assert len(rows) == 240 and len({r["path"] for r in rows}) == 240
    kept = list((out / "overlays").iterdir())
    assert 0 < len(kept) < 240  # the oldest went, the newest are there
    # The newest overlay written is kept (the very last frames may have come while the disk was below the
    # floor, which pauses overlays).
    newest = [r for r in rows if r["overlay"]][-1]
    assert (out / "overlays" / Path(newest["overlay"]).name).exists()
    st = os.statvfs(out)
    assert st.f_bavail * st.f_frsize > 0


def test_once_on_a_disk_too_full_for_rows_ends_and_leaves_no_overlay_without_a_row(
        small_fs: Path, tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", small_fs / "out"
    _noise_frames(cam, 120, side=160)
    store = ResultStore(out)  # results.db exists; then another program fills the disk
    store.close()
    _fill(small_fs / "filler", leave=200_000)
    t, _, box = _start(cam, out, _opts(once=True, after="keep", batch=4, retention=RetentionSettings(min_free_gb=0)))
    t.join(120)
    assert not t.is_alive(), "--once did not end on a full disk"
    s = box["s"]
    assert s.uncommitted > 0 and s.frames + s.uncommitted == 120
    rows = _rows(out)
    assert len(rows) == s.frames
    named = {Path(r["overlay"]).name for r in rows if r["overlay"]}
    assert {p.name for p in (out / "overlays").iterdir()} <= named


def _rows(out: Path) -> list[dict]:
    try:
        return db_rows(out)
    except Exception:  # noqa: BLE001 (not there yet)
        return []


def _events(out: Path) -> list[dict]:
    try:
        with ResultsReader(out / "results.db") as db:
            return db.events()
    except Exception:  # noqa: BLE001
        return []


@pytest.mark.slow
@needs(MOSQUITTO is not None, "Debian's mosquitto (apt-get install mosquitto)")
def test_a_short_soak_loses_no_row(tmp_path: Path) -> None:
    """bench/soak.py for 40 s from a small results.db: every frame has its row and its MQTT message,
    while retention archives the old rows. (The flatness figures need the long runs.)"""
    figures = tmp_path / "soak.json"
    bench = Path(__file__).parent.parent / "bench" / "soak.py"
    r = subprocess.run([sys.executable, str(bench), "--seconds", "40", "--rows", "20000", "--dir", str(tmp_path),
                        "--json", str(figures)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    fig = json.loads(figures.read_text())
    assert fig["published"] == 2000 and fig["lost"] == fig["duplicates"] == fig["not_delivered_mqtt"] == 0
    assert fig["archived_rows"] > 1000 and fig["state_polls"] > 100 and fig["state_failed"] == 0


def test_the_watcher_archives_old_rows_in_its_own_thread(tmp_path: Path) -> None:
    out, cam = tmp_path / "out", tmp_path / "cam"
    cam.mkdir()
    store = ResultStore(out)
    _commit_days(store, [100, 95], per_day=50)
    store.close()
    t, stop, box = _start(cam, out, _opts(after="keep", retention=RetentionSettings(days=90, interval_s=0.05)))
    try:
        _noise_frames(cam, 5)
        wait_for(lambda: len(_rows(out)) == 5 and len(_archived(out)) == 2, 30)
    finally:
        stop.set()
        t.join(60)
    assert box["s"].archived == 100
    assert [r["id"] for r in _rows(out)] == list(range(101, 106))
    assert sum(len(rows) for rows in _archived(out).values()) == 100
