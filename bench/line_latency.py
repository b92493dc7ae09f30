"""Benchmark of the line's outputs: from a frame file appearing to its verdict arriving over MQTT.

A real Mosquitto broker is started on a free loopback port; `inspect watch` (a fake fast detector, as in
bench/watch.py) publishes through the outbox; a subscriber in this process timestamps each message.
Per rate (frames/s), frames are published (write + rename) at a steady pace, then:

    file -> message      rename to the verdict arriving at a subscriber, p50/p99
    file -> row          rename to the row's scored_at (just before its commit), p50/p99
    message - row        what the outbox adds after the row: the commit's fsync, the wake-up, the read,
                         the PUBACK round trip, the mark, the broker's hop to the subscriber; p50/p99,
                         target p99 <= 20 ms at 50 frames/s

    python bench/line_latency.py                      # 10 and 50 frames/s, 20 s each
    python bench/line_latency.py --rates 50 --seconds 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffinspect.config import MqttConfig
from diffinspect.outputs.mqtt import MqttOutput
from diffinspect.store.reader import ResultsReader

_spec = importlib.util.spec_from_file_location("bench_watch", Path(__file__).with_name("watch.py"))
bench_watch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_watch)


def start_broker(root: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = root / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest none"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise SystemExit("mosquitto did not start")


def run_rate(port: int, frames: list[bytes], root: Path, rate: float, seconds: float, batch: int,
             cost_ms: float) -> dict[str, float]:
    import paho.mqtt.client as mqtt

    cam, out = root / f"cam-{rate:g}", root / f"out-{rate:g}"
    arrived: dict[int, float] = {}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{rate:g}")
    sub.on_connect = lambda c, *_: c.subscribe("diffinspect/+/+/verdict", qos=1)
    sub.on_message = lambda c, u, msg: arrived.setdefault(json.loads(msg.payload)["id"], time.time())
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    det = bench_watch.FakeDetector(cost_ms / 1000, "gray")
    output = MqttOutput(MqttConfig(url=f"mqtt://127.0.0.1:{port}", station="bench"))
    n = int(rate * seconds)
    try:
        published = bench_watch.publish_steady(cam, out, det, det, frames, batch, rate, seconds, lambda: len(arrived),
                                               outputs=[output], settle_s=1.0)
    finally:
        sub.loop_stop()
        sub.disconnect()
    with ResultsReader(out / "results.db") as db:
        rows = [r for r in db.rows() if r["path"] in published]
    file_msg = np.array([(arrived[r["id"]] - published[r["path"]]) * 1000 for r in rows if r["id"] in arrived])
    file_row = np.array([(r["scored_at"] - published[r["path"]]) * 1000 for r in rows])
    msg_row = np.array([(arrived[r["id"]] - r["scored_at"]) * 1000 for r in rows if r["id"] in arrived])
    res = {"rate": rate, "frames": n, "rows": len(rows), "messages": len(file_msg)}
    for name, v in (("file_to_message", file_msg), ("file_to_row", file_row), ("message_minus_row", msg_row)):
        p50, p99 = np.percentile(v, [50, 99]) if v.size else (float("nan"),) * 2
        res[f"{name}_p50_ms"], res[f"{name}_p99_ms"] = round(float(p50), 2), round(float(p99), 2)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10,50", help="frames/s, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cost-ms", type=float, default=2.0, help="per-batch cost of the fake detector")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-line-") as tmp:
        root = Path(tmp)
        broker, port = start_broker(root)
        try:
            frames = bench_watch.make_frames(root, 50, a.size, "gray")
            results = [run_rate(port, frames, root, float(r), a.seconds, a.batch, a.cost_ms)
                       for r in a.rates.split(",")]
        finally:
            broker.terminate()
            broker.wait()
    print(f"fake detector {a.cost_ms:g} ms per batch of up to {a.batch}; {a.size} px frames; Mosquitto on loopback")
    for r in results:
        ok = "" if r["rate"] < 50 else ("  (target <= 20 ms: met)" if r["message_minus_row_p99_ms"] <= 20
                                        else "  (target <= 20 ms: MISSED)")
        print(f"{r['rate']:4g} frames/s, {r['messages']}/{r['frames']} messages: "
              f"file->message p50 {r['file_to_message_p50_ms']:.1f} p99 {r['file_to_message_p99_ms']:.1f} ms | "
              f"file->row p50 {r['file_to_row_p50_ms']:.1f} p99 {r['file_to_row_p99_ms']:.1f} ms | "
              f"message-row p50 {r['message_minus_row_p50_ms']:.1f} p99 {r['message_minus_row_p99_ms']:.1f} ms{ok}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
