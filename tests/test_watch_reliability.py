"""Reliability of `inspect watch` (CI variant, well under 90 s on 2 cores): bursts, slow writers,
kill -9, bad frames, a backend failing mid-stream, latency routing, moves, SIGTERM."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from watch_fakes import Factory, FakeDetector, db_rows, frame_bytes, jsonl_rows, n_rows, wait_for

from diffinspect.line import disposal as disposal_module
from diffinspect.line.watch import WatchOptions, WatchSummary, run_watch

FAKES = Path(__file__).with_name("watch_fakes.py")
FAST = {"quiet": True, "stable_ms": 100, "empty_ms": 300, "settle_ms": 400, "rescan_seconds": 0.5}


class Live:
    summary: WatchSummary | None = None


@contextlib.contextmanager
def watching(folders: list[Path], out: Path, primary, fallback=None, **kw: object) -> Iterator[Live]:  # noqa: ANN001
    """run_watch in a thread (as on the line), stopped through its stop event."""
    live, stop = Live(), threading.Event()
    opts = WatchOptions(**{**FAST, **kw, "stop": stop})

    def target() -> None:
        live.summary = run_watch(folders, out, primary, fallback or Factory(name="copod"), opts)

    t = threading.Thread(target=target)
    t.start()
    try:
        wait_for(lambda: (out / "results.jsonl").exists())
        time.sleep(0.2)  # the observer is up before the backlog scan, which comes before the JSONL
        yield live
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()


def assert_mirror(out: Path) -> list[dict]:
    rows = db_rows(out)
    assert jsonl_rows(out) == rows
    return rows


def watcher_process(out: Path, cam: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAKES), str(out), str(cam), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# -- bursts and slow writers -----------------------------------------------------------------------


@pytest.mark.slow
def test_burst_of_2000_frames_is_scored_exactly_once(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    primary = Factory(cost_s=0.003)
    ok, ng = frame_bytes(50), frame_bytes(200)
    with watching([cam], out, primary, queue_size=32, batch=8) as live:
        for i in range(2000):
            (cam / f"b{i:05d}.png").write_bytes(ng if i % 10 == 0 else ok)
        wait_for(lambda: n_rows(out) >= 2000, timeout=60)
        time.sleep(0.6)  # a rescan later: still no second row for anything
    rows = assert_mirror(out)
    assert len(rows) == 2000 and len({r["path"] for r in rows}) == 2000
    assert Counter(r["status"] for r in rows) == {"ok": 1800, "ng": 200}
    det = primary.made[0]
    assert det.seen == 2000 and max(det.batch_sizes) <= 8
    assert live.summary.max_queue_depth <= 32  # the bound held under the burst
    assert live.summary.frames == 2000


def _slow_write(path: Path, data: bytes, seconds: float, reopen: bool) -> None:
    """Write in 10 chunks over `seconds`: one open (flushing each chunk) or reopening per chunk."""
    step = math.ceil(len(data) / 10)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    if reopen:  # every chunk ends with a close-after-write event: the event alone proves nothing
        for chunk in chunks:
            with open(path, "ab") as f:
                f.write(chunk)
            time.sleep(seconds / len(chunks))
    else:
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                time.sleep(seconds / len(chunks))


def test_frames_written_slowly_are_never_scored_half_written(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    primary, fallback = Factory(), Factory(name="copod")
    jobs = [(f"s{i:02d}{ext}", reopen) for i, (ext, reopen) in enumerate(
        [(e, r) for e in (".png", ".jpg", ".bmp", ".tif") for r in (False, True)])]
    with watching([cam], out, primary, fallback, stable_ms=250, settle_ms=600):
        writers = [threading.Thread(target=_slow_write, args=(cam / name, frame_bytes(60, 64, name[-4:]),
                                                              1.0, reopen)) for name, reopen in jobs]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        wait_for(lambda: n_rows(out) >= len(jobs), timeout=20)
        time.sleep(0.3)
    rows = assert_mirror(out)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(name for name, _ in jobs)
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows]
    assert sum(d.incomplete for d in primary.made + fallback.made) == 0


# -- crashes and signals ---------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_then_restart(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    rng = random.Random(7)
    written: list[str] = []
    done = threading.Event()

    def camera() -> None:
        i = 0
        while not done.is_set():
            name = f"c{i:05d}.png"
            (cam / name).write_bytes(frame_bytes(200 if i % 7 == 0 else 50))
            written.append(name)
            i += 1
            time.sleep(0.008)

    cam_thread = threading.Thread(target=camera)
    cam_thread.start()
    try:
        for _ in range(3):
            proc = watcher_process(out, cam, "--after", "move", "--cost-ms", "5")
            before = n_rows(out)
            target = before + rng.randint(3, 80)
            wait_for(lambda t=target, p=proc: n_rows(out) >= t or p.poll() is not None, timeout=30)
            time.sleep(rng.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
    finally:
        done.set()
        cam_thread.join()
    s = run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True, after="move"))
    rows = assert_mirror(out)
    by_name = Counter(Path(r["path"]).name for r in rows)
    assert set(by_name) == set(written) and set(by_name.values()) == {1}
    assert {r["status"] for r in rows} <= {"ok", "ng"}
    assert not list(cam.iterdir())  # every frame moved, none scored twice
    moved = [p.name for d in ("ok", "ng") for p in (out / d).iterdir()]
    assert sorted(moved) == sorted(written)
    assert s.frames < len(written)  # the killed runs did real work


def test_sigterm_commits_the_batch_in_flight_and_exits_0(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i in range(40):
        (cam / f"t{i:03d}.png").write_bytes(frame_bytes(50))
    scored_log = tmp_path / "scored.log"
    proc = watcher_process(out, cam, "--cost-ms", "300", "--scored-log", str(scored_log))
    wait_for(lambda: n_rows(out) >= 8, timeout=30)
    time.sleep(0.1)  # the next batch is now being scored
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    scored = sum(int(n) for n in scored_log.read_text().split())
    rows = assert_mirror(out)
    assert len(rows) == scored and 8 < scored < 40  # every frame scored was committed, then it stopped
    run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True))
    assert len(assert_mirror(out)) == 40


# -- bad frames, failing backends, latency, moves --------------------------------------------------


def test_bad_frames_get_error_rows_and_the_rest_is_scored(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(frame_bytes(50))
    with watching([cam], out, Factory(), max_megapixels=0.01):
        for i in range(20):
            (cam / f"g{i:02d}.png").write_bytes(frame_bytes(50))
            if i == 5:
                (cam / "empty.png").write_bytes(b"")
                (cam / "truncated.png").write_bytes(frame_bytes(50, 64)[:150])
                (cam / "text.jpg").write_text("not an image at all")
                (cam / "huge.png").write_bytes(frame_bytes(50, 200))
                (cam / "link.png").symlink_to(outside)
                (cam / "dangling.png").symlink_to(cam / "missing.png")
                os.mkfifo(cam / "fifo.png")
        wait_for(lambda: n_rows(out) >= 27, timeout=20)
        time.sleep(0.3)
    rows = {Path(r["path"]).name: r for r in assert_mirror(out)}
    assert len(rows) == 27
    errors = {name: r["error"] for name, r in rows.items() if r["status"] == "error"}
    assert errors["empty.png"] == "empty file (0 bytes)"
    assert "not a decodable image" in errors["truncated.png"]
    assert "not a decodable image" in errors["text.jpg"]
    assert "exceeds the limit" in errors["huge.png"]
    assert "outside the watched folder" in errors["link.png"]
    assert "broken symlink" in errors["dangling.png"]
    assert "not a regular file" in errors["fifo.png"]
    assert len(errors) == 7 and all(rows[f"g{i:02d}.png"]["status"] == "ok" for i in range(20))


def test_backend_failing_mid_stream_falls_back_then_recovers(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    made: list[FakeDetector] = []

    def make_detector() -> FakeDetector:
        made.append(FakeDetector(fail_after=40 if not made else None))
        return made[-1]

    with watching([cam], out, make_detector, retry_seconds=0.5):
        for wave in range(4):
            for i in range(40):
                (cam / f"w{wave}-{i:02d}.png").write_bytes(frame_bytes(50))
            wait_for(lambda w=wave: n_rows(out) >= 40 * (w + 1), timeout=20)
            time.sleep(0.3)
    rows = assert_mirror(out)
    assert len(rows) == 160 and {r["status"] for r in rows} == {"ok"}
    fell_back = [r for r in rows if r["detector"] == "copod"]
    assert fell_back and all("device lost" in r["fallback_reason"] for r in fell_back)
    assert len(made) >= 2 and rows[-1]["detector"] == "diffusion"  # re-created after retry_seconds
    assert sum(d.seen for d in made) + len(fell_back) == 160


def test_frames_that_would_miss_the_deadline_go_to_the_fallback(tmp_path: Path) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    with watching([cam], out, Factory(cost_s=0.15), batch=4, max_latency_ms=250) as live:
        for i in range(40):
            (cam / f"l{i:02d}.png").write_bytes(frame_bytes(50))
        wait_for(lambda: n_rows(out) >= 40, timeout=20)
    rows = assert_mirror(out)
    reasons = Counter(r["fallback_reason"] for r in rows)
    late = [r for r in rows if r["fallback_reason"] and r["fallback_reason"].startswith("latency")]
    assert len(rows) == 40 and late and reasons[None] >= 4
    assert all(r["detector"] == "copod" for r in late) and live.summary.fallback == len(late)


@pytest.mark.parametrize("after", ["move", "delete"])
def test_frames_leave_the_folder_only_after_their_row_is_committed(tmp_path: Path, after: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cam, out = tmp_path / "cam", tmp_path / "out"
    cam.mkdir()
    for i in range(12):
        (cam / f"m{i:02d}.png").write_bytes(frame_bytes(200 if i % 3 == 0 else 50))
    (cam / "bad.png").write_bytes(b"junk")
    real, checked = disposal_module.dispose, []

    def checking_dispose(path: Path, size: int, mtime_ns: int, *args: object) -> str | None:
        committed = {(r["path"], r["size"], r["mtime_ns"]) for r in db_rows(out)}
        assert (str(path), size, mtime_ns) in committed
        checked.append(path)
        return real(path, size, mtime_ns, *args)

    monkeypatch.setattr(disposal_module, "dispose", checking_dispose)
    run_watch([cam], out, Factory(), Factory(name="copod"), WatchOptions(**FAST, once=True, after=after))
    assert len(checked) == 13 and not list(cam.iterdir())
    assert len(assert_mirror(out)) == 13
    if after == "move":
        moved = {d: len(list((out / d).iterdir())) for d in ("ok", "ng", "error")}
        assert moved == {"ok": 8, "ng": 4, "error": 1}
