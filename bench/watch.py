"""Benchmark of `inspect watch`: how much of the detector's speed reaches the line, and how long a
frame waits for its row.

1. Throughput: the detector alone on decoded frames (batches of --batch) vs `run_watch` taking the
   same frames from a folder (read, decode, score, commit): ratio, target >= 0.9 at batch 8.
2. Latency: frames published (write + rename) at a steady --rate; time from the rename to the
   committed row, p50/p99.

    python bench/watch.py                        # fake detector, 20 ms per batch
    python bench/watch.py --bundle model/ --backend auto --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.image import Preprocess, decode_image
from diffinspect.line.watch import WatchOptions, run_watch
from diffinspect.scoring.detector import Scored
from diffinspect.store.reader import ResultsReader, count_frames


class FakeDetector:
    """Costs --cost-ms per batch (sleeping, as a backend waiting on its own threads or a GPU does)."""

    name, backend, threshold, pixel_threshold = "diffusion", "fake", 0.5, None

    def __init__(self, cost_s: float, color: str) -> None:
        self.cost_s = cost_s
        self.preprocess = Preprocess(color=color)

    def score(self, frames: list[np.ndarray]) -> Scored:
        time.sleep(self.cost_s)
        return Scored(np.array([f.mean() / 255.0 for f in frames]), None)


def publish_steadily(cam: Path, files: Sequence[bytes], ext: str, rate: float, n: int) -> dict[str, float]:
    """Drop n frames into cam at a steady rate, with the atomic-publish idiom cameras should use (written
    under a temporary name, then renamed); returns each frame's path -> the wall time it appeared."""
    published: dict[str, float] = {}
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        tmp, final = cam / f".s{i:05d}.tmp", cam / f"s{i:05d}.{ext}"
        tmp.write_bytes(files[i % len(files)])
        os.rename(tmp, final)
        published[str(final)] = time.time()
    return published


def make_frames(folder: Path, n: int, size: int, color: str, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    shape = (size, size) if color == "gray" else (size, size, 3)
    out = []
    for _ in range(n):
        ok, buf = cv2.imencode(".png", rng.integers(0, 255, shape, dtype=np.uint8))
        out.append(buf.tobytes())
    return out


def detector_fps(det, frames: list[bytes], batch: int, threaded: bool) -> float:  # noqa: ANN001
    """The detector alone on decoded frames. threaded: called from a worker thread, as watch does;
    on a loaded machine torch's main-thread OpenMP pool measured several times slower than that."""
    decoded = [decode_image(b, det.preprocess.color) for b in frames]
    result: dict[str, float] = {}

    def run() -> None:
        det.score(decoded[:batch])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(decoded), batch):
            det.score(decoded[i:i + batch])
        result["fps"] = len(decoded) / (time.perf_counter() - t0)

    if threaded:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    else:
        run()
    return result["fps"]


def watch_fps(det, fallback, frames: list[bytes], root: Path, batch: int) -> tuple[float, int]:  # noqa: ANN001
    """run_watch --once over the frames as a backlog; its fps runs from the first frame taken to the
    last row committed (the one-off stability wait before the backlog is not counted)."""
    cam = Path(tempfile.mkdtemp(prefix="backlog-", dir=root))
    for i, data in enumerate(frames):
        (cam / f"f{i:05d}.png").write_bytes(data)
    opts = WatchOptions(batch=batch, once=True, quiet=True, overlays="none", stable_ms=50)
    devnull = open(os.devnull, "w")  # noqa: SIM115 (the per-frame lines are not the benchmark)
    stdout, sys.stdout = sys.stdout, devnull
    try:
        s = run_watch([cam], cam.with_name(cam.name + "-out"), lambda: det, lambda: fallback, opts)
    finally:
        sys.stdout = stdout
        devnull.close()
    return s.fps, s.frames


def publish_steady(cam: Path, out: Path, det, fallback, frames: list[bytes], batch: int, rate: float,  # noqa: ANN001
                   seconds: float, arrived: Callable[[], int], outputs: Sequence = (),
                   settle_s: float = 0.5) -> dict[str, float]:
    """Run `inspect watch` on cam in a thread and drop frames into it at a steady rate, with the
    atomic-publish idiom cameras should use; wait (30 s at most) until arrived() counts them all.
    Returns each frame's path -> the wall time it appeared."""
    cam.mkdir()
    stop = threading.Event()
    opts = WatchOptions(batch=batch, quiet=True, overlays="none", stop=stop)
    devnull = open(os.devnull, "w")  # noqa: SIM115 (the per-frame lines are not the benchmark)
    stdout, sys.stdout = sys.stdout, devnull
    watcher = threading.Thread(target=run_watch, args=([cam], out, lambda: det, lambda: fallback, opts),
                               kwargs={"outputs": list(outputs)})
    watcher.start()
    published: dict[str, float] = {}
    try:
        while not (out / "results.jsonl").exists():
            time.sleep(0.05)
        time.sleep(settle_s)
        n = int(rate * seconds)
        published.update(publish_steadily(cam, frames, "png", rate, n))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and arrived() < n:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
        sys.stdout = stdout
        devnull.close()
    return published


def steady_latency(det, fallback, frames: list[bytes], root: Path, batch: int, rate: float,  # noqa: ANN001
                   seconds: float) -> np.ndarray:
    out = root / "out-steady"
    published = publish_steady(root / "steady", out, det, fallback, frames, batch, rate, seconds,
                               lambda: count_frames(out / "results.db"))
    with ResultsReader(out / "results.db") as db:
        rows = db.rows()
    return np.array([(r["scored_at"] - published[r["path"]]) * 1000 for r in rows if r["path"] in published])


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="a calibrated model bundle (default: a fake detector)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cost-ms", type=float, default=20.0, help="per-batch cost of the fake detector")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--rate", type=float, default=10.0, help="frames/s for the latency run")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds (medians)")
    a = p.parse_args()

    if a.bundle:
        from diffinspect.scoring.loader import load_detector, load_fallback

        det = load_detector(a.bundle, backend=a.backend, device=a.device)
        fallback = load_fallback(a.bundle)
        what = f"{det.name} on {det.backend}"
    else:
        det = FakeDetector(a.cost_ms / 1000, "gray")
        fallback = FakeDetector(0.001, "gray")
        what = f"fake detector, {a.cost_ms:g} ms per batch"
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        root = Path(tmp)
        frames = make_frames(root, a.frames, a.size, det.preprocess.color)
        # Rounds alternate, and medians are compared: other jobs on the machine come and go.
        mains, threads, throughs = [], [], []
        for _ in range(a.rounds):
            mains.append(detector_fps(det, frames, a.batch, threaded=False))
            threads.append(detector_fps(det, frames, a.batch, threaded=True))
            through, n = watch_fps(det, fallback, frames, root, a.batch)
            throughs.append(through)
        main_fps, thread_fps, through = (float(np.median(x)) for x in (mains, threads, throughs))
        alone = max(main_fps, thread_fps)  # compare with the best the detector can do
        lat = steady_latency(det, fallback, frames, root, a.batch, a.rate, a.seconds)
    ratio = through / alone
    p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
    print(f"{what}; {a.frames} frames of {a.size} px; batch {a.batch}")
    print(f"detector alone     : {alone:8.1f} frames/s   (main thread {main_fps:.1f}, worker thread "
          f"{thread_fps:.1f})")
    print(f"watch (backlog)    : {through:8.1f} frames/s over {n} rows   ratio {ratio:.2f} (target >= 0.9)"
          f"   [rounds: {_fmt(throughs)} vs {_fmt(threads)}]")
    print(f"latency at {a.rate:g} fps : p50 {p50:.1f} ms   p99 {p99:.1f} ms   ({lat.size} frames, rename -> "
          f"committed row)")
    print(json.dumps({"detector_fps": alone, "detector_fps_main_thread": main_fps, "watch_fps": through,
                      "ratio": ratio, "latency_p50_ms": p50, "latency_p99_ms": p99, "batch": a.batch,
                      "detector": what}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
