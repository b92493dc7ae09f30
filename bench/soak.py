"""Soak bench: months on one line, compressed into an hour. Does anything grow or slow down?

One `inspect watch` (its own process, a fake 2 ms detector) takes frames at a steady rate from a camera folder and moves
them into OUT; every verdict goes to a real Mosquitto broker on a free loopback port; `inspect station`
serves OUT while 4 clients poll /api/state (another process, loopback only, bounded loops); retention is
on. results.db starts with --rows rows spread over the time the line needs to make them, and the rows
keep --keep-days of that: old rows leave for OUT/archive/ as fast as new ones come, as on a line that
has run for months. Overlays and moved frames are held within --disk-gb.

Checked at the end (each line says met or MISSED):
    no row lost         every frame published has one row, in results.db or OUT/archive/, and MQTT got it
    RSS                 of the watcher's process: its peak after warm-up <= 10 % over the first sample
    open files          of the watcher's process: median of the last window <= 10 % over the first's
    commit p99          ResultStore.commit time, last window / first window <= 1.2
    /api/state p99      as the 4 clients saw it, last window / first window <= 1.2
The windows are 10 minutes (a third of the run after warm-up when that is shorter).

    python bench/soak.py --minutes 60 --rows 10000000      # the hour: 50 frames/s, 10 million rows
    python bench/soak.py --minutes 10 --rows 10000000      # ten minutes (CI)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from diffinspect.config import MqttConfig, RetentionSettings
from diffinspect.data.image import Preprocess
from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.outputs.mqtt import MqttOutput
from diffinspect.scoring.detector import Scored
from diffinspect.store import results as store_results
from diffinspect.store.deliveries import Deliveries
from diffinspect.store.reader import ResultsReader
from diffinspect.store.results import ResultStore

CLIENTS = 4


class FakeDetector:
    """Sleeps cost_s per batch (a backend waiting on its accelerator); score = mean brightness."""

    name, backend, threshold, pixel_threshold = "diffusion", "fake", 0.5, None

    def __init__(self, cost_s: float) -> None:
        self.cost_s = cost_s
        self.preprocess = Preprocess(color="gray")

    def score(self, frames: list[np.ndarray]) -> Scored:
        time.sleep(self.cost_s)
        return Scored(np.array([f.mean() / 255.0 for f in frames]), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(root: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = root / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest none",
             "max_queued_messages 0"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, "mosquitto")
    return proc, port


def wait_port(port: int, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not start")


def build_database(out: Path, rows: int, rate: float) -> float:
    """results.db with `rows` rows made at `rate` frames/s up to now, all delivered to MQTT; returns the
    span they cover in seconds. Written directly with sqlite3 (fast, unsynchronised): a bench fixture."""
    ResultStore(out).close()  # the schema, as the watcher makes it
    span = rows / rate
    t0 = time.time() - span
    db = sqlite3.connect(out / "results.db")
    db.execute("PRAGMA synchronous=OFF")
    chunk = 100_000
    for start in range(0, rows, chunk):
        batch = []
        for i in range(start, min(rows, start + chunk)):
            t = t0 + i / rate
            status = "ng" if i % 50 == 0 else "ok"
            row = {"path": f"/line/cam1/old{i:08d}.png", "folder": "/line/cam1", "size": 4200, "mtime": t,
                   "mtime_ns": i, "status": status, "score": 0.4, "threshold": 0.5, "detector": "diffusion",
                   "backend": "fake", "latency_ms": 3.0, "received_at": t, "scored_at": t}
            batch.append(tuple(row.get(c) for c in store_results._COLUMNS))  # unnamed columns: NULL
        db.executemany(store_results._INSERT, batch)
        db.commit()
    db.execute("DROP TABLE seconds")  # the store summarises the built rows once, as for an older database
    db.commit()
    db.close()
    # The mirror of the built rows holds only the last one: the store opening them would otherwise write
    # them all out first, and the mirror's size is not what the soak measures.
    last = t0 + (rows - 1) / rate
    (out / "results.jsonl").write_text(json.dumps({"id": rows, "scored_at": last}) + "\n")
    os.utime(out / "results.jsonl", (last, last))
    ResultStore(out).close()
    with Deliveries(out / "results.db") as d:  # a year of frames was delivered long ago
        d.start_marks({"mqtt": "frames", "mqtt/events": "events"}, replay=False)
    return span


def timed_commits(log: Path) -> None:
    """Time every ResultStore.commit (the lock, the transaction, the fsync, the mirror) into the file `log`,
    (monotonic time, ms) as two doubles a commit: a list in memory would grow the watcher's RSS by itself."""
    real = ResultStore.commit
    f = open(log, "ab", buffering=0)  # noqa: SIM115 (open while the watcher runs)

    def commit(self, rows):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        try:
            return real(self, rows)
        finally:
            f.write(struct.pack("dd", time.monotonic(), (time.perf_counter() - t0) * 1000))

    ResultStore.commit = commit


def read_commits(log: Path) -> list[tuple[float, float]]:
    data = log.read_bytes()
    return list(struct.iter_unpack("dd", data[:len(data) // 16 * 16]))


def sample_process(pid: int, log: list[tuple[float, int, int]], stop: threading.Event, every_s: float) -> None:
    """(time, RSS bytes, open files) of the watcher's process."""
    while not stop.wait(every_s):
        rss = 0
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
            log.append((time.monotonic(), rss, len(os.listdir(f"/proc/{pid}/fd"))))
        except OSError:
            return


def poll(url: str, seconds: float, log_path: str, clients: int) -> int:
    """The pollers' process: `clients` threads GET url until `seconds` pass, once a second each as a page
    does; writes (time, ms) lines."""
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    r.read()
                ms = (time.perf_counter() - t0) * 1000
            except OSError:
                ms = float("nan")
            with lock:
                results.append((time.monotonic(), ms))
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(log_path).write_text("\n".join(f"{t} {ms}" for t, ms in results))
    return 0


def publish(cam: Path, frames: list[bytes], rate: float, seconds: float, published: dict[str, float],
            stop: threading.Event) -> None:
    """Frames at a steady rate, each written aside and renamed in (the atomic publish cameras use)."""
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        if stop.is_set():
            return
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        tmp, final = cam / f".f{i:08d}.tmp", cam / f"f{i:08d}.png"
        tmp.write_bytes(frames[i % len(frames)])
        os.rename(tmp, final)
        published[str(final)] = time.time()


def windows(series: list[tuple[float, float]], start: float, end: float, window_s: float) -> tuple[list, list]:
    first = [v for t, v in series if start <= t < start + window_s and v == v]
    last = [v for t, v in series if end - window_s <= t <= end and v == v]
    return first, last


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    span = p.add_mutually_exclusive_group()
    span.add_argument("--minutes", type=float, default=60.0, help="how long the line runs")
    span.add_argument("--seconds", type=float, default=None, help="the same in seconds (short runs)")
    p.add_argument("--rate", type=float, default=50.0, help="frames/s")
    p.add_argument("--rows", type=int, default=10_000_000, help="rows in results.db at the start")
    p.add_argument("--warmup", type=float, default=None, help="seconds not measured (default: 5 %% of the run)")
    p.add_argument("--window", type=float, default=600.0, help="first/last window in seconds")
    p.add_argument("--disk-gb", type=float, default=0.02, help="budget for overlays + moved frames")
    p.add_argument("--cost-ms", type=float, default=2.0)
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here too")
    p.add_argument("--poll", nargs=3, metavar=("URL", "SECONDS", "LOG"), help=argparse.SUPPRESS)
    p.add_argument("--watch", nargs=5, metavar=("OUT", "CAM", "PORT", "DAYS", "LOG"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.seconds = a.seconds if a.seconds is not None else 60.0 * a.minutes
    if a.poll:
        return poll(a.poll[0], float(a.poll[1]), a.poll[2], CLIENTS)
    if a.watch:
        out, cam, port, days, log = a.watch
        return watch(a, Path(out), Path(cam), int(port), float(days), Path(log))
    if a.dir is not None:
        a.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="soak-", dir=a.dir))
    try:
        return run(a, root)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def watch(a: argparse.Namespace, out: Path, cam: Path, mqtt_port: int, keep_days: float, log: Path) -> int:
    """The watcher's process (so its RSS and open files are the watcher's alone): until SIGTERM."""
    timed_commits(log.with_suffix(".commits"))
    output = MqttOutput(MqttConfig(url=f"mqtt://127.0.0.1:{mqtt_port}", station="soak"))
    opts = WatchOptions(quiet=True, overlays="ng", after="move",
                        retention=RetentionSettings(days=keep_days, disk_gb=a.disk_gb, min_free_gb=1.0))
    det = FakeDetector(a.cost_ms / 1000)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (quiet mode's line per frame is not the bench)
    s = run_watch([cam], out, lambda: det, lambda: det, opts, outputs=[output])
    log.write_text(json.dumps({"uncommitted": s.uncommitted, "archived": s.archived}))
    return 0


def run(a: argparse.Namespace, root: Path) -> int:
    import paho.mqtt.client as mqtt

    cam, out = root / "cam", root / "out"
    cam.mkdir()
    out.mkdir()
    t_build = time.monotonic()
    span = build_database(out, a.rows, a.rate) if a.rows else 0.0
    print(f"results.db: {a.rows} rows built in {time.monotonic() - t_build:.0f} s", flush=True)
    keep_days = max(span, 60.0) / 86400  # old rows leave as fast as new ones come
    broker, mqtt_port = start_broker(root)
    station_port = free_port()
    station = subprocess.Popen([sys.executable, "-m", "diffinspect", "station", str(out), "--port", str(station_port)],
                               stdout=subprocess.DEVNULL, stderr=open(root / "station.log", "w"))  # noqa: SIM115
    received: dict[int, int] = {}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-subscriber")
    sub.on_connect = lambda c, *_: c.subscribe("diffinspect/+/+/verdict", qos=1)

    def on_message(client, userdata, msg) -> None:  # noqa: ANN001
        rid = json.loads(msg.payload)["id"]
        received[rid] = received.get(rid, 0) + 1

    sub.on_message = on_message
    samples: list[tuple[float, int, int]] = []
    published: dict[str, float] = {}
    done = threading.Event()
    pollers = watcher = None
    watch_log = root / "watch.json"
    try:
        wait_port(station_port, "inspect station")
        sub.connect("127.0.0.1", mqtt_port)
        sub.loop_start()
        rng = np.random.default_rng(0)
        frames = [cv2.imencode(".png", rng.integers(0, 255, (64, 64), np.uint8))[1].tobytes() for _ in range(200)]
        watcher = subprocess.Popen([sys.executable, __file__, "--watch", str(out), str(cam), str(mqtt_port),
                                    repr(keep_days), str(watch_log), "--disk-gb", repr(a.disk_gb),
                                    "--cost-ms", repr(a.cost_ms)])
        probe = cam / "probe.png"  # measure from the watcher's first commit on, not its start-up
        probe.write_bytes(frames[0])
        while watcher.poll() is None and probe.name not in {Path(p).name for p in _newest(out)}:
            time.sleep(0.2)
        t0 = time.monotonic()
        poll_log = root / "poll.log"
        pollers = subprocess.Popen([sys.executable, __file__, "--poll", f"http://127.0.0.1:{station_port}/api/state",
                                    str(a.seconds), str(poll_log)])
        sampler = threading.Thread(target=sample_process, args=(watcher.pid, samples, done,
                                                                max(1.0, a.seconds / 360)), daemon=True)
        sampler.start()
        publish(cam, frames, a.rate, a.seconds, published, done)
        t_end = time.monotonic()
        deadline = time.monotonic() + 60
        last = list(published)[-1] if published else None
        while last is not None and time.monotonic() < deadline and last not in _newest(out):
            time.sleep(0.5)
        time.sleep(3.0)
    finally:
        done.set()
        if watcher is not None:
            watcher.terminate()  # SIGTERM: the watcher commits what is in flight and writes its log
            watcher.wait(120)
        if pollers is not None:
            pollers.wait(timeout=a.seconds + 120)
        sub.loop_stop()
        sub.disconnect()
        station.terminate()
        station.wait()
        broker.terminate()
        broker.wait()
    log = json.loads(watch_log.read_text())
    commits = read_commits(watch_log.with_suffix(".commits"))
    return report(a, out, t0, t_end, published, received, commits, samples, root / "poll.log", log)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _newest(out: Path) -> set[str]:
    with ResultsReader(out / "results.db") as db:
        return {r["path"] for r in db.rows(after=db.max_id() - 200)}


def report(a: argparse.Namespace, out: Path, t0: float, t_end: float, published: dict[str, float],
           received: dict[int, int], commits: list, samples: list, poll_log: Path, summary: dict) -> int:
    rows: dict[str, int] = {}  # path -> id of the soak's rows (after the built ones), in results.db and the archive
    dup = 0
    with ResultsReader(out / "results.db") as db:
        for r in db.rows(after=a.rows):
            dup += r["path"] in rows
            rows[r["path"]] = r["id"]
        left = db.count()
    archived = 0
    for f in sorted((out / "archive").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as g:
            for line in g:
                archived += 1
                r = json.loads(line)
                if r["id"] > a.rows:
                    dup += r["path"] in rows
                    rows[r["path"]] = r["id"]
    lost = [p for p in published if p not in rows]
    not_sent = [p for p in published if p in rows and rows[p] not in received]
    warm = a.warmup if a.warmup is not None else 0.05 * a.seconds
    start = t0 + warm
    window = min(a.window, (t_end - start) / 3)
    polls = [tuple(map(float, line.split())) for line in poll_log.read_text().splitlines() if line.strip()]
    c_first, c_last = windows(commits, start, t_end, window)
    s_first, s_last = windows(polls, start, t_end, window)
    after = [s for s in samples if s[0] >= start]
    rss0, files0 = (after[0][1], after[0][2]) if after else (0, 0)
    rss_growth = max(s[1] for s in after) / rss0 - 1 if after else float("nan")
    # Open files are a small count that one file in use for a moment (the day's archive, an overlay being
    # written) moves by 5 % or more: a leak is a trend, so the last window's median is held to the first's.
    f_first, f_last = windows([(t, n) for t, _, n in after], start, t_end, window)
    files_growth = float(np.median(f_last)) / float(np.median(f_first)) - 1 if f_first and f_last else float("nan")
    fig = {
        "seconds": a.seconds, "rate": a.rate, "start_rows": a.rows, "published": len(published),
        "lost": len(lost), "duplicates": dup, "not_delivered_mqtt": len(not_sent),
        "archived_rows": archived, "rows_left": left,
        "rss_mb_after_warmup": round(rss0 / 2**20, 1), "rss_growth": round(rss_growth, 3),
        "open_files_after_warmup": files0, "open_files_growth": round(files_growth, 3),
        "window_s": round(window, 1),
        "commit_p99_ms_first": round(p99(c_first), 2), "commit_p99_ms_last": round(p99(c_last), 2),
        "state_p99_ms_first": round(p99(s_first), 1), "state_p99_ms_last": round(p99(s_last), 1),
        "state_polls": len(polls), "state_failed": sum(1 for _, ms in polls if ms != ms),
        "commit_p50_ms": round(float(np.median([v for _, v in commits])), 2) if commits else None,
        "state_p50_ms": round(float(np.nanmedian([ms for _, ms in polls])), 1) if polls else None,
        "wal_mb_at_end": round(_size(out / "results.db-wal") / 2**20, 1),
        "db_mb_at_end": round(_size(out / "results.db") / 2**20, 1),
        "uncommitted": summary.get("uncommitted"),
    }
    fig["commit_ratio"] = round(fig["commit_p99_ms_last"] / fig["commit_p99_ms_first"], 2)
    fig["state_ratio"] = round(fig["state_p99_ms_last"] / fig["state_p99_ms_first"], 2)
    checks = [("no row lost, none twice, all delivered", not lost and not dup and not not_sent),
              ("RSS growth <= 10 %", rss_growth <= 0.10), ("open files growth <= 10 %", files_growth <= 0.10),
              ("commit p99 last/first <= 1.2", fig["commit_ratio"] <= 1.2),
              ("/api/state p99 last/first <= 1.2", fig["state_ratio"] <= 1.2)]
    print(json.dumps(fig, indent=1))
    for name, ok in checks:
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    fig["checks"] = {name: ok for name, ok in checks}
    if a.json:
        a.json.write_text(json.dumps(fig, indent=1))
    return 0 if not lost and not dup and not not_sent else 1


if __name__ == "__main__":
    sys.exit(main())
