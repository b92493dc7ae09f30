"""`inspect demo`: a whole synthetic production line, every stage a factory runs, in minutes.

generate a line -> train -> distil -> calibrate -> export (INT8) -> a simulated camera drops frames
(mostly good, some defective, a few corrupt) while the watcher scores them -> evaluation report.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.synthetic import DEFECTS, make_line, render_frame
from diffinspect.store.reader import count_frames

log = logging.getLogger(__name__)

PRODUCT = "washer"


@dataclass
class DemoPlan:
    image_size: int
    model_size: str
    train_minutes: float
    train_steps: int
    distill_iterations: int
    distill_minutes: float
    frame_size: int
    n_train: int
    stream_frames: int
    corrupt_frames: int
    frames_per_second: float

    @classmethod
    def for_mode(cls, fast: bool) -> DemoPlan:
        if fast:
            return cls(32, "tiny", 0.5, 120, 20, 0.5, 64, 80, 24, 2, 40.0)
        return cls(64, "small", 1.5, 3000, 60, 1.0, 128, 200, 120, 3, 8.0)


@dataclass
class DemoResult:
    workdir: Path
    bundle: Path
    report: Path
    results_db: Path
    overlays: Path
    frames_dropped: int
    corrupt_dropped: int
    export: str
    headline: dict
    seconds: float
    station: str = ""  # the command that shows this run's results live in a browser


def simulate_camera(feed: Path, plan: DemoPlan, seed: int = 1) -> tuple[int, int]:
    """Drop frames into feed at a steady rate, written under a temporary name and renamed into place,
    as camera SDKs do; a few are corrupt. Returns (frames dropped, corrupt frames)."""
    rng = np.random.default_rng(seed)
    feed.mkdir(parents=True, exist_ok=True)
    corrupt_at = set(rng.choice(plan.stream_frames, plan.corrupt_frames, replace=False).tolist())
    for i in range(plan.stream_frames):
        name = feed / f"frame_{i:05d}.png"
        tmp = feed / f".frame_{i:05d}.tmp"
        if i in corrupt_at:
            tmp.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64) if i % 2 else b"")
        else:
            defect = str(rng.choice(DEFECTS)) if rng.random() < 0.15 else None
            img, _ = render_frame(PRODUCT, rng, plan.frame_size, defect)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            tmp.write_bytes(buf.tobytes())
        tmp.rename(name)
        time.sleep(1.0 / plan.frames_per_second)
    return plan.stream_frames, plan.corrupt_frames


def run_demo(workdir: Path, fast: bool = False) -> DemoResult:
    from diffinspect.config import load_config
    from diffinspect.evaluation.evaluate import evaluate
    from diffinspect.line.watch import WatchOptions, run_watch
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.scoring.inspector import Inspector
    from diffinspect.train import train

    t0 = time.monotonic()
    plan = DemoPlan.for_mode(fast)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log.info(f"1/6 generating a synthetic {PRODUCT} line in {workdir / 'line'}")
    line = make_line(workdir / "line", PRODUCT, n_train=plan.n_train, n_test_good=30 if fast else 60,
                     n_test_defect=20 if fast else 50, size=plan.frame_size, seed=0)
    log.info(f"2/6 training a {plan.model_size} U-Net at {plan.image_size} px (at most {plan.train_minutes} min)")
    cfg = load_config(overrides={"model.size": plan.model_size, "data.image_size": plan.image_size,
                                 "train.steps": plan.train_steps, "train.max_minutes": plan.train_minutes,
                                 "data.holdout": 0.3})
    bundle = workdir / "model"
    train(line, bundle, cfg, overwrite=True)
    rate = 0.05
    log.info(f"3/6 calibrating on held-out good parts (false-reject rate {rate}), then distilling a 2-step student "
             f"(at most {plan.distill_minutes} min)")
    calibrate(bundle, None, rate, backend="torch")
    _distill(bundle, plan)
    log.info("4/6 exporting the scoring graph to INT8")
    export = _export(bundle)
    log.info(f"5/6 a camera drops {plan.stream_frames} frames into {workdir / 'camera_feed'} while the watcher scores")
    feed, results = workdir / "camera_feed", workdir / "results"
    for old in feed.glob("*") if feed.exists() else []:
        old.unlink()
    stop = threading.Event()
    dropped: list[tuple[int, int]] = []
    camera = threading.Thread(target=lambda: dropped.append(simulate_camera(feed, plan)), daemon=True)
    backend = "auto"
    options = WatchOptions(batch=8, overlays="ng", quiet=True, stop=stop, stable_ms=100, settle_ms=500,
                           rescan_seconds=1)
    watcher_out: list = []
    broker, mqtt = _local_broker(workdir / "broker")
    watcher = threading.Thread(target=lambda: watcher_out.append(run_watch(
        [feed], results, lambda: Inspector.load(bundle, backend), lambda: Inspector.fallback(bundle),
        options, outputs=[mqtt] if mqtt else [])), daemon=True)
    feed.mkdir(parents=True, exist_ok=True)
    watcher.start()
    camera.start()
    camera.join()
    deadline = time.monotonic() + 120
    while count_frames(results / "results.db") < plan.stream_frames and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    watcher.join(timeout=60)
    if broker is not None:
        broker.terminate()
        broker.wait(10)
    summary = watcher_out[0] if watcher_out else None
    log.info("6/6 writing the evaluation report")
    report_dir = workdir / "report"
    report = evaluate([bundle], [line], report_dir)
    figures = report["datasets"][line.name]["diffinspect"]
    headline = {
        "image_auroc": figures.get("image_auroc"), "pixel_auroc": figures.get("pixel_auroc"),
        "false_reject_rate": figures.get("false_reject_rate"), "miss_rate": figures.get("miss_rate"),
        "frames_per_second": summary.fps if summary else None,
        "frames_scored": summary.frames if summary else count_frames(results / "results.db"),
        "ng": summary.ng if summary else None, "errors": summary.error if summary else None,
        "mqtt_acknowledged": mqtt.acknowledged_rows if mqtt else None, "mqtt_url": mqtt.cfg.url if mqtt else None,
    }
    station = f"inspect station {results}   (then open http://127.0.0.1:8765/)"
    return DemoResult(workdir, bundle, report_dir / "report.html", results / "results.db", results / "overlays",
                      dropped[0][0] if dropped else 0, dropped[0][1] if dropped else 0, export, headline,
                      time.monotonic() - t0, station)


def _local_broker(folder: Path):  # noqa: ANN202
    """Mosquitto on a free loopback port, when installed, so the demo shows verdicts leaving over MQTT."""
    import os
    import shutil
    import socket
    import subprocess

    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        return None, None
    from diffinspect.config import MqttConfig
    from diffinspect.outputs.mqtt import MqttOutput

    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = ["user root"] if os.geteuid() == 0 else []  # as root it would drop to a user without our folder
    (folder / "mosquitto.conf").write_text("\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true",
                                                      "log_dest none", *user]) + "\n")
    proc = subprocess.Popen([exe, "-c", str(folder / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                log.info(f"   publishing verdicts to a local MQTT broker, mqtt://127.0.0.1:{port}")
                return proc, MqttOutput(MqttConfig(url=f"mqtt://127.0.0.1:{port}", station="demo"))
        time.sleep(0.05)
    proc.terminate()
    return None, None


def _distill(bundle: Path, plan: DemoPlan) -> None:
    try:
        from diffinspect.train.distill import distill
    except ImportError:
        log.info("   (distillation not available in this version: scoring with the teacher)")
        return
    distill(bundle, steps=2, iterations=plan.distill_iterations, max_minutes=plan.distill_minutes)


def _export(bundle: Path) -> str:
    try:
        from diffinspect.export import export_bundle
    except ImportError:
        log.info("   (export not available in this version: scoring with torch)")
        return "torch"
    for fmt in ("openvino", "onnx"):
        try:
            export_bundle(bundle, format=fmt, precision="int8")
            return f"{fmt} int8"
        except Exception as exc:  # noqa: BLE001 - a missing runtime must not end the demo
            log.info(f"   {fmt} INT8 export failed ({exc}); trying the next format")
    return "torch"
