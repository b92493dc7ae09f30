"""`inspect watch` against a hostile line: file names that are not UTF-8, results files deleted under it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_watch_reliability import assert_mirror, watching
from watch_fakes import Factory, db_rows, frame_bytes, jsonl_rows, n_rows, wait_for, write_frame

from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.logs import storable
from diffinspect.scoring.record import Record

FAST = {"quiet": True, "stable_ms": 30, "empty_ms": 150, "settle_ms": 150, "rescan_seconds": 0.3}


def bad_name(folder: Path, stem: bytes = b"bad\xff") -> Path:
    """A frame whose name is not valid UTF-8 (as a camera with a Latin-1 locale writes them)."""
    raw = os.fsencode(folder) + b"/" + stem + b".png"
    with open(raw, "wb") as f:
        f.write(frame_bytes(50))
    return Path(os.fsdecode(raw))


def camera(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """A camera folder holding n good frames, and the watcher's output folder."""
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i in range(n):
        write_frame(cam / f"a{i}.png", 50)
    return cam, out


def test_storable_keeps_names_readable_and_distinct() -> None:
    assert storable("plain/é.png") == "plain/é.png"
    assert storable(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert storable(os.fsdecode(b"bad\xfe.png")) != storable(os.fsdecode(b"bad\xff.png"))
    assert json.loads(json.dumps(Record(os.fsdecode(b"x\xff"), "ok", 1.0, 2.0, None, None, None, None, None)
                                 .to_dict()))["path"] == "x\\xff"


def test_a_name_that_is_not_utf8_at_start_up_does_not_stop_the_line(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i in range(3):
        write_frame(cam / f"f{i}.png", 50)
    bad_name(cam)
    s = run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True))
    assert s.scored == 4
    rows = assert_mirror(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["bad\\xff.png", "f0.png", "f1.png", "f2.png"]
    again = run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True))
    assert again.frames == 0  # found in results.db by its recorded name: not scored twice


def test_a_name_that_is_not_utf8_gets_its_overlay(tmp_path: Path) -> None:
    from diffinspect.scoring.overlay import overlay_name

    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    odd = bad_name(cam)
    run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True, overlays="all"))
    (row,) = assert_mirror(out)
    st = os.stat(odd)
    assert row["status"] == "ok" and row["error"] is None
    assert row["overlay"] == str(out / "overlays" / overlay_name(str(odd), st.st_size, st.st_mtime_ns))
    assert Path(row["overlay"]).stat().st_size > 0


def test_a_name_that_is_not_utf8_arriving_later_does_not_stop_the_line(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    write_frame(cam / "first.png", 50)
    with watching([cam], out, Factory(), after="move"):
        wait_for(lambda: n_rows(out) == 1)
        bad_name(cam)
        for i in range(3):
            write_frame(cam / f"later{i}.png", 50)
        wait_for(lambda: n_rows(out) == 5)
    rows = assert_mirror(out)
    moved = [r for r in rows if r["path"].endswith("bad\\xff.png")]
    assert len(moved) == 1 and moved[0]["status"] == "ok"
    assert not list(cam.iterdir())  # every frame, the odd name included, went to OUT/ok


def test_results_deleted_under_a_running_watcher_are_written_again(tmp_path: Path) -> None:
    cam, out = camera(tmp_path, 3)
    with watching([cam], out, Factory()):
        wait_for(lambda: n_rows(out) == 3)
        for name in ("results.db", "results.db-wal", "results.db-shm", "results.jsonl"):
            (out / name).unlink(missing_ok=True)
        (out / "results.jsonl").write_text("not ours\n")  # someone put a file in its place
        for i in range(2):
            write_frame(cam / f"b{i}.png", 50)
        wait_for(lambda: (out / "results.db").exists() and n_rows(out) == 5)
    rows = assert_mirror(out)
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    assert [p.read_text() for p in out.glob("results.jsonl.replaced-*")] == ["not ours\n"]  # kept, not deleted
    again = run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True))
    assert again.frames == 0  # a restart does not score the line again
    assert db_rows(out) == jsonl_rows(out) == rows


def test_live_view_and_exit_line_give_the_same_rate(monkeypatch) -> None:  # noqa: ANN001
    """The live view once said 1.0 frames/s where the exit line said 36.4: both now show the rate
    while scoring, and the view adds the last 10 s."""
    from diffinspect.line import counters
    from diffinspect.line.console import View

    clock = [100.0]
    monkeypatch.setattr(counters.time, "monotonic", lambda: clock[0])
    stats = counters.Stats()
    stats.started()
    for t in (100.5, 101.0):
        clock[0] = t
        stats.record([Record("f.png", "ok", 1.0, 2.0, "diffusion", "fake", 5.0, None, None) for _ in range(18)])
    clock[0] = 130.0  # idle since
    assert stats.summary(0, 30.0).fps == stats.busy_rate() == 36.0
    assert stats.rate() == 0.0
    view = View(stats, [], [Path("cam")], 8, lambda: 0).table()
    cells = dict(zip(view.columns[0]._cells, view.columns[1]._cells, strict=True))
    assert cells["frames/s, last 10 s / while scoring"] == "0.0 / 36.0"


def test_results_db_deleted_while_readers_hold_it_is_restored_whole(tmp_path: Path) -> None:
    """`rm results.db` (its -wal and -shm stay) while the station view or an output has it open: the
    restored database must not pick up the old database's write-ahead log."""
    import sqlite3

    cam, out = camera(tmp_path, 3)
    with watching([cam], out, Factory()):
        wait_for(lambda: n_rows(out) == 3)
        reader = sqlite3.connect(out / "results.db")
        try:
            assert reader.execute("SELECT COUNT(*) FROM frames").fetchone()[0] == 3
            (out / "results.db").unlink()
            for i in range(4):
                write_frame(cam / f"b{i}.png", 50)
            wait_for(lambda: (out / "results.db").exists() and n_rows(out) == 7)
        finally:
            reader.close()
    db = sqlite3.connect(out / "results.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    rows = assert_mirror(out)
    assert len(rows) == 7 and [r["id"] for r in rows] == sorted(r["id"] for r in rows)


def test_a_threshold_that_is_not_a_number_gives_error_rows_with_a_reason(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i in range(3):
        write_frame(cam / f"f{i}.png", 200)  # far above any threshold: NaN must not make them OK either
    nan_threshold = Factory()
    run_watch([cam], out, _with_threshold(nan_threshold, float("nan")), _with_threshold(Factory(name="copod"),
              float("nan")), WatchOptions(**FAST, once=True))
    rows = assert_mirror(out)
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all("threshold is not a finite number" in r["error"] for r in rows)


def _with_threshold(factory: Factory, threshold: float) -> Factory:
    make = factory.__call__

    def call() -> object:
        det = make()
        det.threshold = threshold
        return det
    return call  # type: ignore[return-value]
