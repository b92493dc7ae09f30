"""`inspect station` on a results.db of months: `/api/state` latency with 4 browsers polling.

Builds OUT/results.db with ROWS frames (default 50 million: 11.6 days at 50 frames/s, the newest scored
now; 1 % NG, 0.1 % errors, a health JSON on every scored row) straight into SQLite with
`INSERT ... SELECT` from a recursive CTE, in big transactions, then opens it once with the watcher's
ResultStore, which summarises the rows into the seconds table (the migration an older results.db goes
through). The database is kept and reused by later runs (`--rebuild` makes it again); it takes about
250 bytes a row, so check `df -h` first and give `--rows` less when the disk cannot hold it.

Then `inspect station OUT` runs as its own process on a free loopback port, while this process keeps
a watcher's ResultStore open and commits WRITE frames/s into it (so the station reads a live WAL
database, as on the line), and CLIENTS threads each poll `/api/state` POLLS times, INTERVAL s apart.
Prints p50 / p99 / max of the polls and p99 against the 50 ms target.

    python bench/station_scale.py [--out /tmp/station_scale] [--rows 50000000] [--clients 4] [--polls 150]
    python bench/station_scale.py --path /static/style.css     # the same clients on a fixed file: the floor
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from diffinspect.scoring.record import Record
from diffinspect.store.results import ResultStore

TARGET_MS = 50.0
RATE = 50.0  # frames/s of the line the rows come from
CHUNK = 2_000_000  # rows per transaction

# One row per i of the CTE; its scored_at is :end - (:total - i) / RATE.
FILL = f"""
WITH RECURSIVE n(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM n WHERE i < :stop)
INSERT INTO frames (path, folder, size, mtime, mtime_ns, status, score, threshold, detector, backend, latency_ms,
                    overlay, error, fallback_reason, received_at, scored_at, health)
SELECT '/line/cam1/frame_' || printf('%010d', i) || '.png', '/line/cam1', 180000 + i % 977, t - 0.2, i,
       s, CASE s WHEN 'error' THEN NULL WHEN 'ng' THEN 0.9 + (i % 13) / 100.0 ELSE 0.2 + (i % 29) / 100.0 END,
       CASE s WHEN 'error' THEN NULL ELSE 0.8 END, CASE s WHEN 'error' THEN NULL ELSE 'diffusion' END,
       CASE s WHEN 'error' THEN NULL ELSE 'onnxruntime:cpu' END, 18.0 + (i % 17),
       CASE s WHEN 'ng' THEN :out || '/overlays/frame_' || printf('%010d', i) || '.png' END,
       CASE s WHEN 'error' THEN 'cannot decode: truncated file' END, NULL, t - 0.05, t,
       CASE s WHEN 'error' THEN NULL ELSE
            '{{"brightness": ' || (118 + i % 5) || '.5, "contrast": 31.2, "sharpness": -0.41, "shift": 0.012}}' END
FROM (SELECT i, :end - (:total - i) / {RATE} t,
             CASE WHEN i % 1000 = 7 THEN 'error' WHEN i % 100 = 3 THEN 'ng' ELSE 'ok' END s FROM n)
"""


def build(out: Path, rows: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ResultStore(out).close()  # the schema, as the watcher makes it
    db = sqlite3.connect(out / "results.db", isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("DROP TABLE seconds")  # a database from before the summary: the watcher summarises it on open
    end = time.time()
    t0 = time.perf_counter()
    for start in range(1, rows + 1, CHUNK):
        stop = min(rows, start + CHUNK - 1)
        db.execute("BEGIN")
        db.execute(FILL, {"start": start, "stop": stop, "out": str(out), "end": end, "total": rows})
        db.execute("COMMIT")
        done = time.perf_counter() - t0
        print(f"  {stop:>11,} rows  {done:7.1f} s  ({stop / done:,.0f} rows/s)", flush=True)
    db.close()
    # The JSON mirror is not what this bench measures: mark it caught up rather than write 50 M lines.
    (out / "results.jsonl").write_text(json.dumps({"id": rows}) + "\n")
    t0 = time.perf_counter()
    ResultStore(out).close()
    print(f"  seconds table summarised on the watcher's first open in {time.perf_counter() - t0:.1f} s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(port: int, n: int, interval: float, times: list[float], errors: list[str], path: str = "/api/state") -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or (path == "/api/state" and not json.loads(body)["ready"]):
                errors.append(f"{r.status} {body[:200]!r}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        dt = time.perf_counter() - t0
        times.append(dt * 1000)
        time.sleep(max(0.0, interval - dt))
    conn.close()


def write(out: Path, per_second: float, stop: threading.Event) -> int:
    """A watcher's commits while the station is polled: batches of 10 frames, PER_SECOND frames/s."""
    store = ResultStore(out)
    n = 0
    try:
        while not stop.wait(10 / per_second):
            now = time.time()
            store.commit([Record(path=f"/line/cam1/live_{now:.6f}_{k}.png", status="ok", score=0.3, threshold=0.8,
                                 detector="diffusion", backend="onnxruntime:cpu", latency_ms=20.0, overlay=None,
                                 error=None, folder="/line/cam1", size=1, mtime=now, mtime_ns=int(now * 1e9) + k,
                                 received_at=now - 0.02, scored_at=now) for k in range(10)])
            n += 10
    finally:
        store.close()
    return n


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/station_scale"))
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--rebuild", action="store_true", help="make the database again even if OUT holds one")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--polls", type=int, default=150, help="polls per client")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between one client's polls")
    ap.add_argument("--write", type=float, default=50.0, help="frames/s a watcher commits meanwhile (0: none)")
    ap.add_argument("--path", default="/api/state",
                    help="what the clients GET (/static/style.css: the floor a busy machine sets on any request)")
    args = ap.parse_args()

    out = args.out
    marker = out / "rows.txt"
    if args.rebuild or not marker.is_file() or int(marker.read_text()) != args.rows:
        shutil.rmtree(out, ignore_errors=True)
        print(f"building {out}/results.db with {args.rows:,} rows", flush=True)
        build(out, args.rows)
        marker.write_text(str(args.rows))
    size = (out / "results.db").stat().st_size
    print(f"{out}/results.db: {args.rows:,} rows, {size / 1e9:.1f} GB", flush=True)

    stop = threading.Event()
    written: list[int] = []
    writer = threading.Thread(target=lambda: written.append(write(out, args.write, stop)), daemon=True)
    if args.write > 0:
        writer.start()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    station = subprocess.Popen([sys.executable, "-m", "diffinspect", "station", str(out), "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or station.poll() is not None:
                    raise SystemExit("the station did not start") from None
                time.sleep(0.2)
        warm: list[float] = []
        poll(port, 3, 0.0, warm, [])  # first polls: the page cache of a cold database
        times: list[float] = []
        errors: list[str] = []
        clients = [threading.Thread(target=poll, args=(port, args.polls, args.interval, times, errors, args.path))
                   for _ in range(args.clients)]
        t0 = time.perf_counter()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.perf_counter() - t0
    finally:
        station.terminate()
        station.wait(timeout=30)
        stop.set()
        if writer.is_alive():
            writer.join(timeout=30)
    p50, p99 = pct(times, 50), pct(times, 99)
    print(f"{args.path}, {args.clients} clients x {args.polls} polls ({args.interval} s apart) over {wall:.0f} s, "
          f"{sum(written)} frames committed meanwhile; first cold polls {', '.join(f'{t:.0f}' for t in warm)} ms; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {max(times):.1f} ms   "
          f"p99 / {TARGET_MS:.0f} ms target = {p99 / TARGET_MS:.2f}   errors {len(errors)}")
    for e in errors[:5]:
        print(f"  error: {e}")


if __name__ == "__main__":
    main()
