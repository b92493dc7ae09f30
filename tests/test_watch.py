"""Unit-level tests of `inspect watch`: completeness checks, the results store, routing, layout."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from watch_fakes import Factory, FakeDetector, db_rows, frame_bytes, jsonl_rows, n_rows, wait_for, write_frame

from diffinspect import DiffinspectError
from diffinspect.data.image import ImageError, convert_color, decode_image
from diffinspect.line.disposal import dispose
from diffinspect.line.frame import Candidate, FrameChanged, looks_complete, read_frame
from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.scoring.record import Record as FrameRow
from diffinspect.store.results import ResultStore

FAST = {"quiet": True, "stable_ms": 30, "empty_ms": 150, "settle_ms": 150, "rescan_seconds": 0.3}


def options(**kw: object) -> WatchOptions:
    return WatchOptions(**{**FAST, **kw})


def once(folders: list[Path], out: Path, primary: Factory | None = None, fallback: Factory | None = None,
         **kw: object):
    return run_watch(folders, out, primary or Factory(), fallback or Factory(name="copod"),
                     options(once=True, **kw))


def frames_in(folder: Path, n: int, start: int = 0, ng_every: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_frame(folder / f"f{i:04d}.png", 200 if ng_every and i % ng_every == 0 else 50)
            for i in range(start, start + n)]


def row(path: str, **kw: object) -> FrameRow:
    base = dict(path=path, folder="/cam", size=1, mtime=1.0, mtime_ns=1_000_000_000, status="ok", score=1.0,
                threshold=2.0, detector="diffusion", backend="fake", latency_ms=1.0, overlay=None, error=None,
                fallback_reason=None, received_at=1.0, scored_at=2.0)
    return FrameRow(**{**base, **kw})


# -- completeness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_looks_complete_refuses_any_prefix(ext: str) -> None:
    data = frame_bytes(50, size=32, ext=ext)
    assert looks_complete(data)
    for cut in (10, len(data) // 2, len(data) - 1):
        assert not looks_complete(data[:cut]), cut


def test_read_frame_checks_identity_and_kind(tmp_path: Path) -> None:
    cam = tmp_path / "cam"
    p = write_frame((cam.mkdir() or cam) / "a.png", 50)
    st = p.stat()
    good = Candidate(p, cam, st.st_size, st.st_mtime_ns, time.time())
    assert read_frame(good, None) == p.read_bytes()
    with pytest.raises(FrameChanged):  # grew since it was found complete
        read_frame(Candidate(p, cam, st.st_size - 1, st.st_mtime_ns, time.time()), None)
    with pytest.raises(ImageError, match="larger than"):
        read_frame(good, 10)
    outside = write_frame(tmp_path / "secret.png", 50)
    (cam / "link.png").symlink_to(outside)
    with pytest.raises(ImageError, match="outside the watched folder"):
        read_frame(Candidate(cam / "link.png", cam, st.st_size, st.st_mtime_ns, 0.0), None)
    os.mkfifo(cam / "pipe.png")
    with pytest.raises(ImageError, match="not a regular file"):
        read_frame(Candidate(cam / "pipe.png", cam, 0, 0, 0.0), None)


# -- the results store -----------------------------------------------------------------------------


def test_store_commits_a_frame_once(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert len(store.commit([row("/cam/a.png"), row("/cam/b.png")])) == 2
    assert store.commit([row("/cam/a.png", status="ng")]) == []  # same frame: ignored
    assert len(store.commit([row("/cam/a.png", size=2)])) == 1  # same name, new content: new frame
    assert store.status_of("/cam/a.png", 1, 1_000_000_000) == "ok"
    store.close()
    rows = db_rows(tmp_path)
    assert len(rows) == 3 and [r["id"] for r in rows] == sorted({r["id"] for r in rows})
    assert jsonl_rows(tmp_path) == rows
    with open(tmp_path / "results.db", "rb") as f:
        assert f.read(16) == b"SQLite format 3\x00"


def seconds_naive(out: Path) -> list[tuple]:
    """The seconds table as it must be: one GROUP BY over every row of frames."""
    with sqlite3.connect(out / "results.db") as db:
        return db.execute("SELECT CAST(scored_at AS INTEGER) - (scored_at < CAST(scored_at AS INTEGER)) s, "
                          "SUM(status = 'ok'), SUM(status = 'ng'), SUM(status = 'error'), MIN(id), MAX(id), "
                          "SUM(status = 'hold') FROM frames GROUP BY s ORDER BY s").fetchall()


def seconds_kept(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "results.db") as db:
        return db.execute("SELECT * FROM seconds ORDER BY second").fetchall()


def test_store_keeps_the_seconds_summary_in_each_commit(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    times = [100.0, 100.5, 99.9, 101.0, -0.5, 100.2]  # lanes interleave: not in time order by id
    statuses = ["ok", "ng", "error", "ok", "ng", "ok"]
    store.commit([row(f"/cam/{i}.png", scored_at=t, status=s)
                  for i, (t, s) in enumerate(zip(times, statuses, strict=True))])
    store.commit([row("/cam/0.png", scored_at=100.0)])  # the same frame again: no row, so not counted
    store.commit([row("/cam/9.png", scored_at=100.7, status="ng")])
    with pytest.raises(sqlite3.Error):  # a failed batch leaves the summary as it was
        store.commit([row("/cam/10.png", scored_at=100.1), row("/cam/11.png", size=[1])])
    store.close()
    assert seconds_kept(tmp_path) == seconds_naive(tmp_path)
    assert [r[:4] for r in seconds_kept(tmp_path)] == [(-1, 0, 1, 0), (99, 0, 0, 1), (100, 2, 2, 0), (101, 1, 0, 0)]


def test_store_summarises_a_database_from_before_the_seconds_table_once(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.commit([row(f"/cam/{i}.png", scored_at=1000 + i / 3, status="ng" if i % 4 else "ok") for i in range(30)])
    store.close()
    with sqlite3.connect(tmp_path / "results.db") as db:
        db.execute("DROP TABLE seconds")  # as an older version wrote it
    ResultStore(tmp_path).close()
    assert seconds_kept(tmp_path) == seconds_naive(tmp_path) and len(seconds_kept(tmp_path)) == 10
    store = ResultStore(tmp_path)  # summarised once: opening again adds nothing
    store.commit([row("/cam/new.png", scored_at=1009.5)])
    store.close()
    assert seconds_kept(tmp_path) == seconds_naive(tmp_path)


def test_store_repairs_jsonl_after_a_crash(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.commit([row(f"/cam/{i}.png") for i in range(5)])
    store.close()
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    # Crash after the commit of rows 4-5 and in the middle of writing row 4's line.
    (tmp_path / "results.jsonl").write_text("".join(lines[:3]) + lines[3][:17])
    store = ResultStore(tmp_path)
    assert store.reconciled == 2
    store.commit([row("/cam/5.png")])
    store.close()
    assert jsonl_rows(tmp_path) == db_rows(tmp_path)
    assert len(db_rows(tmp_path)) == 6


def test_store_rebuilds_jsonl_that_runs_ahead(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.commit([row("/cam/a.png")])
    store.close()
    with open(tmp_path / "results.jsonl", "a") as f:  # a line whose commit never happened
        f.write(json.dumps({**db_rows(tmp_path)[0], "id": 9, "path": "/cam/ghost.png"}) + "\n")
    ResultStore(tmp_path).close()
    assert jsonl_rows(tmp_path) == db_rows(tmp_path)


def test_store_refuses_a_second_watcher(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with pytest.raises(DiffinspectError, match="already writing"):
        ResultStore(tmp_path)
    store.close()
    ResultStore(tmp_path).close()


def test_dispose_never_overwrites(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    paths = frames_in(cam, 1)
    (out / "ok").mkdir(parents=True)
    (out / "ok" / "f0000.png").write_bytes(b"earlier frame")
    st = paths[0].stat()
    dest = dispose(paths[0], st.st_size, st.st_mtime_ns, "ok", "move", out)
    assert dest == str(out / "ok" / "f0000-1.png")
    assert (out / "ok" / "f0000.png").read_bytes() == b"earlier frame"
    write_frame(paths[0], 60)  # same name, new frame: not the one the row describes
    with pytest.raises(OSError, match="changed"):
        dispose(paths[0], st.st_size, st.st_mtime_ns - 1, "ok", "move", out)
    assert paths[0].exists()


# -- whole runs (once) -----------------------------------------------------------------------------


def test_backlog_oldest_first_with_overlays(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    paths = frames_in(cam, 12, ng_every=4)
    for i, p in enumerate(paths):  # names and ages in opposite orders
        os.utime(p, ns=(time.time_ns(), time.time_ns() - (i + 1) * 10**9))
    s = once([cam], out)
    rows = db_rows(out)
    assert [Path(r["path"]).name for r in rows] == [p.name for p in reversed(paths)]
    assert (s.scored, s.ng, s.ok, s.error, s.fallback) == (12, 3, 9, 0, 0)
    for r in rows:  # overlays=ng by default, through the real overlay module
        assert (r["overlay"] is not None) == (r["status"] == "ng")
        assert r["overlay"] is None or Path(r["overlay"]).stat().st_size > 0
        assert r["path"] == os.path.abspath(r["path"]) and r["folder"] == str(cam)
        assert r["received_at"] <= r["scored_at"] and r["latency_ms"] >= 0
    assert jsonl_rows(out) == rows


def test_overlays_as_jpeg_where_the_settings_ask(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 4, ng_every=2)
    once([cam], out, overlays="all", overlay_format="jpg")
    written = [Path(r["overlay"]) for r in db_rows(out)]
    assert len(written) == 4 and {p.suffix for p in written} == {".jpg"}
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in written)  # JPEG files, under the name the row gives
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(p.name for p in written)


def test_the_summary_splits_the_time_by_stage(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 8, ng_every=4)
    primary = Factory(cost_s=0.04)
    s = once([cam], out, primary, batch=4)
    assert list(s.stages) == ["decode", "health", "preprocess", "model", "map", "overlay", "commit"]
    assert all(v >= 0 for v in s.stages.values()) and s.stages["decode"] > 0 and s.stages["commit"] > 0
    # The detector sleeps 40 ms per call: at least that per batch is the model's, and it dominates.
    assert s.stages["model"] >= 40.0 * primary.made[0].calls / 8 - 1e-6
    assert max(s.stages, key=s.stages.get) == "model"


def test_large_jpeg_frames_are_decoded_smaller_with_maps_on_their_own_grid(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i, value in enumerate((50, 200)):  # ok, ng
        img = np.full((1024, 768), value, np.uint8)
        cv2.imwrite(str(cam / f"f{i}.jpg"), img)
    drawn: list[tuple] = []

    def writer(path, frame, amap, *rest) -> None:  # noqa: ANN001
        drawn.append((frame.shape, amap.shape))
        path.write_bytes(b"overlay")

    # No health profile, a whole-frame 8 px input: scoring needs 2 x 128 px a side (the embedding's).
    s = run_watch([cam], out, Factory(check_marker=False), Factory(name="copod"), options(once=True),
                  overlay_writer=writer)
    assert (s.ok, s.ng) == (1, 1)
    # 768 / 4 = 192 px would be too few: decoded at half size, the map on the frame's own 1024 x 768 grid.
    assert drawn == [((512, 384, 1), (1024, 768))]


def test_restart_does_not_rescore_and_moves_committed_frames(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 6, ng_every=3)
    once([cam], out)  # keep
    primary = Factory()
    once([cam], out, primary=primary, after="move")  # as if a crash hit between commit and move
    assert primary.made[0].seen == 0
    assert len(db_rows(out)) == 6
    assert not list(cam.iterdir())
    assert len(list((out / "ok").iterdir())) == 4 and len(list((out / "ng").iterdir())) == 2


def test_same_name_new_content_is_a_new_frame(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    (p,) = frames_in(cam, 1)
    once([cam], out)
    write_frame(p, 220)
    os.utime(p, ns=(time.time_ns(), p.stat().st_mtime_ns + 10**9))
    once([cam], out)
    assert [r["status"] for r in db_rows(out)] == ["ok", "ng"]


def test_files_that_are_not_frames_are_ignored(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 2)
    write_frame(cam / ".hidden.png", 50)  # the usual temporary name of a frame being written
    (cam / "f.png.part").write_bytes(b"x")
    (cam / "notes.txt").write_text("x")
    write_frame((cam / "sub").mkdir() or cam / "sub" / "deep.png", 50)
    once([cam], out)
    assert sorted(Path(r["path"]).name for r in db_rows(out)) == ["f0000.png", "f0001.png"]
    once([cam], tmp_path / "out2", recursive=True, pattern="*.PNG")
    assert len(db_rows(tmp_path / "out2")) == 3


def test_out_inside_the_watched_folder(tmp_path: Path) -> None:
    cam = tmp_path / "cam"
    frames_in(cam, 4, ng_every=2)
    once([cam], cam / "results", recursive=True, overlays="all", after="move")
    once([cam], cam / "results", recursive=True, overlays="all", after="move")
    rows = db_rows(cam / "results")
    assert len(rows) == 4  # its own overlays and moved frames are never taken as frames


def test_per_folder_detectors_and_folder_tags(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    frames_in(a, 3)
    frames_in(b, 5)
    special = Factory()
    run_watch([a, b], out, Factory(), Factory(name="copod"), options(once=True),
              per_folder={b: (special, Factory(name="copod"))})
    rows = db_rows(out)
    assert sorted(r["folder"] for r in rows) == [str(a)] * 3 + [str(b)] * 5
    assert special.made[0].seen == 5
    with pytest.raises(DiffinspectError, match="not watched"):
        run_watch([a], out, Factory(), Factory(), options(once=True), per_folder={b: (special, special)})


def test_detector_that_cannot_load_uses_the_fallback(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 5)
    primary = Factory(fail_first=99)
    s = once([cam], out, primary=primary)
    rows = db_rows(out)
    assert s.fallback == 5 and {r["detector"] for r in rows} == {"copod"}
    assert all("no accelerator" in r["fallback_reason"] for r in rows)


def test_both_detectors_failing_gives_error_rows(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3)
    s = once([cam], out, primary=Factory(fail_after=0), fallback=Factory(name="copod", fail_after=0))
    rows = db_rows(out)
    assert s.error == 3 and all("device lost" in r["error"] for r in rows)


def test_non_finite_scores_go_to_the_fallback(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3)
    once([cam], out, primary=Factory(nan=True))
    assert {(r["detector"], r["fallback_reason"]) for r in db_rows(out)} == {
        ("copod", "diffusion score not finite")}


def test_a_detector_giving_a_wrong_number_of_scores_counts_as_failed(tmp_path: Path) -> None:
    class Short(FakeDetector):
        def score(self, frames: list[np.ndarray]):  # noqa: ANN201
            out = super().score(frames)
            return type(out)(out.scores[:-1], None)

    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3)
    once([cam], out, primary=lambda: Short())
    rows = db_rows(out)
    assert {r["detector"] for r in rows} == {"copod"} and len(rows) == 3
    assert all(re.search(r"returned \d+ scores for \d+ frames", r["fallback_reason"]) for r in rows)


def test_hung_detector_is_abandoned(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 4)
    t0 = time.monotonic()
    once([cam], out, primary=Factory(hang_s=30), score_timeout_s=0.3)
    assert time.monotonic() - t0 < 10
    rows = db_rows(out)
    assert len(rows) == 4 and all("no answer within" in r["fallback_reason"] for r in rows)


def test_detector_that_hangs_while_loading_does_not_hold_the_line(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3)

    def wedged() -> FakeDetector:
        time.sleep(30)
        return FakeDetector()

    t0 = time.monotonic()
    s = once([cam], out, primary=wedged, score_timeout_s=0.3)
    assert time.monotonic() - t0 < 10 and s.fallback == 3
    assert {r["fallback_reason"] for r in db_rows(out)} == {"diffusion detector still loading"}


def test_colour_of_the_fallback_differs(tmp_path: Path) -> None:
    class RgbFallback(FakeDetector):
        def score(self, frames: list[np.ndarray]):  # noqa: ANN201
            assert all(f.shape[2] == 3 for f in frames)
            return super().score(frames)

    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 2)
    fb = RgbFallback(name="copod")
    object.__setattr__(fb, "preprocess", type(fb.preprocess)(color="rgb"))
    once([cam], out, primary=Factory(fail_after=0), fallback=lambda: fb)
    assert [r["detector"] for r in db_rows(out)] == ["copod", "copod"]


def test_quiet_mode_prints_one_line_per_frame(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3, ng_every=2)
    (cam / "bad.png").write_bytes(b"not an image")
    once([cam], out)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert sum(" ng " in line for line in lines) == 2 and sum("error" in line for line in lines) == 1


def test_quiet_cli_logs_time_stamped_warnings_on_stderr(tmp_path: Path, capsys, monkeypatch) -> None:
    """`inspect watch --quiet` is a service: its warnings are time-stamped lines on stderr, its frames one
    line each on stdout."""
    from test_hardening import run_cli

    from diffinspect.scoring.inspector import Inspector

    def no_accelerator(*a: object, **k: object) -> None:
        raise RuntimeError("no accelerator (fake)")

    monkeypatch.setattr(Inspector, "load", no_accelerator)
    monkeypatch.setattr(Inspector, "fallback", classmethod(lambda cls, *a, **k: cls(FakeDetector(name="copod"))))
    monkeypatch.chdir(tmp_path)
    Path("model").mkdir()
    Path("model/manifest.json").write_text('{"schema_version": 1, "diffinspect_version": "0", "files": {}}')
    frames_in(Path("cam"), 2)
    code, out, err = run_cli(capsys, "watch", "cam", "--model", "model", "--once", "--quiet", "--out", "res")
    assert code == 0, err
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}"
    warned = [line for line in err.splitlines() if "diffusion detector unavailable" in line]
    assert len(warned) == 1
    assert re.fullmatch(stamp + r" WARNING diffusion detector unavailable: RuntimeError: no accelerator \(fake\); "
                        r"the fallback scores frames, retry in \d+ s", warned[0]), warned[0]
    frames = out.splitlines()
    assert len(frames) == 2 and all(re.match(stamp + r" \w+ .*/cam/f000[01]\.png$", line) for line in frames), frames


def test_live_view_shows_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 3, ng_every=3)  # f0000 is NG
    s = once([cam], out, quiet=False)
    assert s.scored == 3
    shown = capsys.readouterr()
    assert shown.out == ""  # interactive mode: the table, not one line per frame
    table = {cells[0]: cells[1] for line in shown.err.splitlines()
             if len(cells := [c.strip() for c in line.strip("│ ").split("│")]) == 2}
    assert table["frames"] == "3"
    assert table["OK / NG / error"] == "2 / 1 / 0"
    assert table["detector cam"] == "diffusion (fake)"
    assert table["last NG"] != "-"  # the NG frame's path (truncated to the column)


def test_stop_event_and_new_files(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 2)
    stop = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.update(s=run_watch(
        [cam], out, Factory(), Factory(name="copod"), options(stop=stop))))
    t.start()
    try:
        wait_for(lambda: n_rows(out) == 2)
        frames_in(cam, 3, start=2)
        (cam / "late.tmp").write_bytes(frame_bytes(50))
        os.rename(cam / "late.tmp", cam / "late.png")  # the atomic-publish idiom
        wait_for(lambda: n_rows(out) == 6)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and result["s"].scored == 6


def test_folder_removed_and_recreated(tmp_path: Path) -> None:
    """A camera share unmounted and mounted again: the watcher keeps going and finds new frames."""
    import shutil

    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 2)
    stop = threading.Event()
    t = threading.Thread(target=run_watch, args=([cam], out, Factory(), Factory(name="copod"),
                                                 options(stop=stop)))
    t.start()
    try:
        wait_for(lambda: n_rows(out) == 2)
        shutil.rmtree(cam)
        time.sleep(0.5)
        frames_in(cam, 3, start=10)
        wait_for(lambda: n_rows(out) == 5)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_mirror_catches_up_after_a_failed_write(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)

    class DiskFull:
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f, self.fail = f, True

        def write(self, text: str) -> None:
            if self.fail:
                self.fail = False
                self.f.write(text[:5])  # a torn write, then ENOSPC
                raise OSError(28, "No space left on device")
            self.f.write(text)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.f, name)

    store._jsonl = DiskFull(store._jsonl)
    store.commit([row("/cam/a.png")])  # committed; its line could not be written
    store.commit([row("/cam/b.png")])
    store.close()
    assert jsonl_rows(tmp_path) == db_rows(tmp_path) and len(db_rows(tmp_path)) == 2


def test_unreadable_results_database_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "results.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DiffinspectError, match="move results.db"):
        ResultStore(tmp_path)
    (tmp_path / "results.db").unlink()
    ResultStore(tmp_path).close()  # the lock was released


def test_name_reused_while_the_old_frame_is_being_scored(tmp_path: Path) -> None:
    """after=move: the camera writes a new frame under a name whose old frame is in the pipeline."""
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    stop = threading.Event()
    opts = options(stop=stop, after="move", rescan_seconds=60)  # only events, no safety net
    t = threading.Thread(target=run_watch, args=([cam], out, Factory(cost_s=0.4), Factory(name="copod"),
                                                 opts))
    t.start()
    try:
        wait_for(lambda: (out / "results.jsonl").exists())
        time.sleep(0.2)
        write_frame(cam / "same.png", 50)
        time.sleep(0.2)  # now being scored (0.4 s)
        os.unlink(cam / "same.png")
        write_frame(cam / "same.png", 200)
        wait_for(lambda: n_rows(out) == 2, timeout=5)
    finally:
        stop.set()
        t.join(10)
    assert [r["status"] for r in db_rows(out)] == ["ok", "ng"]
    # The old frame's file was replaced before it could be moved: only the new one is in ng/.
    assert [len(list((out / d).glob("same*.png"))) for d in ("ok", "ng")] == [0, 1]
    assert not list(cam.iterdir())


def test_options_are_checked(tmp_path: Path) -> None:
    for bad in ({"overlays": "some"}, {"overlay_format": "tiff"}, {"after": "archive"}, {"batch": 0},
                {"queue_size": 2, "batch": 8}, {"max_latency_ms": 0}):
        with pytest.raises(DiffinspectError):
            run_watch([tmp_path], tmp_path / "out", Factory(), Factory(), options(**bad))
    with pytest.raises(DiffinspectError, match="not found"):
        run_watch([tmp_path / "nope"], tmp_path / "out", Factory(), Factory(), options())


def test_on_commit_hooks_get_each_new_row_once_before_its_file_moves(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    frames_in(cam, 6, ng_every=2)
    seen: list[tuple[str, int | None, bool]] = []

    def outbox_down(rows: list) -> None:
        raise RuntimeError("outbox unreachable")

    def hook(rows: list) -> None:
        seen.extend((r.path, r.id, Path(r.path).exists()) for r in rows)

    run_watch([cam], out, Factory(), Factory(name="copod"), options(once=True, after="move"),
              on_commit=[outbox_down, hook])
    rows = db_rows(out)
    assert len(rows) == 6 and sorted(seen) == sorted((r["path"], r["id"], True) for r in rows)
    assert not list(cam.iterdir())  # a failing hook cost neither rows nor the moves


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_one_luma_frames_converted_equal_frames_decoded_in_the_other_mode(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(3)
    for img in (rng.integers(0, 256, (21, 34, 3), dtype=np.uint8),
                rng.integers(0, 65536, (21, 34, 4), dtype=np.uint16)):
        ok, buf = cv2.imencode(ext, img)
        assert ok
        data = buf.tobytes()
        rgb, gray = decode_image(data, "rgb"), decode_image(data, "gray")
        assert np.array_equal(convert_color(rgb, "gray"), gray)
        assert np.array_equal(convert_color(gray, "rgb"), decode_image(cv2.imencode(".png", gray)[1].tobytes(),
                                                                     "rgb"))
