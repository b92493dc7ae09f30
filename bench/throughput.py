"""Frames per second per box: `inspect watch` end to end, the peers on the same frames, and the CPU's limit.

1. End to end: the real `run_watch --once` over a folder this bench fills with 4:3 frames of the
   synthetic washer line at 0.3, 2 and 5 megapixels (JPEG colour by default; PNG and gray files on
   request), scored by the default bundle (small U-Net at the default 64 px input, default recipe:
   frame term, health profile) trained and calibrated on frames of that same line and view, exported
   INT8 to OpenVINO. So the good parts pass, as on a line: the typical mix is good parts with
   --ng-share of them carrying a synthetic defect (3 % by default); the NG count of each run is the
   detector's own verdicts. Runs, side by side in one process (--variants), each a lever:
     int8                     the typical mix, overlays of NG frames (PNG)
     int8 overlays all        an overlay for every frame (`--overlays all`), PNG
     int8 overlays all jpg    the same, written as JPEG (`[watch] overlay_format = "jpg"`)
     int8 batch 1             the typical mix, micro-batch 1 instead of 8
     int8 2 lanes x 1 thread  the frames over two camera folders, each its own lane and engine on one
                              thread, against one lane whose engine uses both cores
     int8 whole decode        the typical mix with its health profile taken as fitted on whole frames
                              (as a profile calibrated before profiles recorded their read scale): every
                              frame decoded whole, the side by side of the reduced decode the others get
     int8-nohealth            no health profile (no drift alarms)
     copod                    the COPOD fallback alone
   frames/s over the backlog, then latency p50/p99 (file renamed into the folder -> row committed) of
   a steady feed at half that rate (int8 and copod), and the time per frame by stage from the run's
   own stage clock (scoring/stages.py).
2. Peers (--peers): anomalib's EfficientAD-S, PaDiM and PatchCore at their default 256 x 256 input,
   exported by anomalib to OpenVINO FP32 and INT8 (its INT8_PTQ, in the peer venv of bench/peers.py,
   made on first use under --peer-venv), timed by the same harness as our engine: the model alone on
   inputs already at model size, and frame -> score (decode, resize, model) on the same JPEG frames.
   Random backbone weights: speed does not depend on the weights' values. --student N adds a 1-step
   student distilled for N iterations (its speed only) beside the default recipe's one-step teacher.
3. The limit: multiply-accumulates per frame of each graph (Conv, MatMul, Gemm, counted from the ONNX
   graph with its shapes inferred) beside the CPU's measured peak in the same run: an FP32 GEMM
   (numpy) and an INT8 matmul (onnxruntime MatMulInteger and an OpenVINO INT8 FC), and the share of
   the INT8 / FP32 peak each engine reaches.

The machine this runs on is shared (2 cores, other jobs coming and going): compare figures side by side
within one run, as ratios, not across runs. The default invocation is the one whose figures the README's
"Frames per second per box" tables give (the bundle is built once under --workdir, a few minutes):

    python bench/throughput.py --workdir /tmp/throughput --json /tmp/throughput/run.json
    python bench/throughput.py --workdir /tmp/throughput --peers --student 200   # + anomalib's, a student
    python bench/throughput.py --formats jpg,png --colors rgb,gray             # the other files
    python bench/throughput.py --providers cuda,tensorrt                        # onnxruntime on a GPU (untested)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.synthetic import render_frame

MEGAPIXELS = {"0.3": (480, 640), "2": (1200, 1600), "5": (1944, 2592)}
PRODUCT = "washer"
PEERS = ("efficientad_s", "padim", "patchcore")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- frames of the line, and the default bundle trained on them ------------------------------------


def line_frame(rng: np.random.Generator, width: int, defect: str | None = None) -> np.ndarray:
    """One 4:3 RGB frame of the synthetic washer line at `width` (the middle of a square render), the
    geometry of every frame here: the bundle's training and calibration frames and the bench's."""
    h = width * 3 // 4
    img = render_frame(PRODUCT, rng, width, defect)[0]
    return np.ascontiguousarray(img[(width - h) // 2:(width - h) // 2 + h])


def good_frame(mp: str, seed: int, i: int) -> np.ndarray:
    """A good part at one resolution (4:3), rendered at 0.3 MP as the bundle's frames were: the renderer
    draws its textures in pixels, so a part rendered larger is another product to the bundle. A larger
    frame is that render enlarged (cubic) with a little sensor noise, so its file costs what a real one
    of its size costs."""
    h, w = MEGAPIXELS[mp]
    img = line_frame(np.random.default_rng([seed, i]), MEGAPIXELS["0.3"][1])
    if mp == "0.3":
        return img
    big = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    return np.clip(big + np.random.default_rng([seed, i, 1]).normal(0.0, 2.0, big.shape), 0, 255).astype(np.uint8)


def write_frames(folder: Path, n: int, make: Callable[[int], np.ndarray], fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"{i:03d}.{fmt}"
        if not path.exists():  # kept from an interrupted build: the same seed renders the same frame
            path.write_bytes(encode(make(i), fmt, "rgb"))
    return folder


def has_int8(bundle: Path) -> bool:
    """Whether the bundle's active version holds its OpenVINO INT8 export (the bench's bundles are built
    once and reused)."""
    from diffinspect.bundle import Bundle, is_bundle

    return is_bundle(bundle) and Bundle.load(bundle, verify=False).has("openvino/model.int8.xml")


def default_bundle(workdir: Path, steps: int) -> Path:
    """A small U-Net at the default input, default recipe, trained on good frames of the same line and
    view as the bench's frames (4:3, 320 px wide), calibrated on 160 others as the camera gives them
    (0.3 MP JPEG, so the health profile is that camera's) at the default false-reject rate, exported to
    ONNX FP32 (for the MAC count) and OpenVINO INT8; made once under workdir and reused."""
    from diffinspect.config import load_config
    from diffinspect.export import export_bundle
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.train import train

    out = workdir / "line-bundle"
    calib_dir = write_frames(workdir / "line-frames" / "calibration", 160, partial(good_frame, "0.3", 2), "jpg")
    if has_int8(out):
        if read_whole(out):
            calibrate(out, calib_dir)
        return out
    train_dir = write_frames(workdir / "line-frames" / "train" / "good", 64,
                             lambda i: line_frame(np.random.default_rng([1, i]), 320), "png")
    cfg = load_config(overrides={"model.size": "small", "data.image_size": 64, "train.steps": steps,
                                 "train.batch_size": 8, "data.holdout": 0.25})
    t0 = time.perf_counter()
    train(train_dir.parent.parent, out, cfg)
    calibrate(out, calib_dir)
    export_bundle(out, "onnx", "fp32")
    export_bundle(out, "openvino", "fp32")
    export_bundle(out, "openvino", "int8")
    log(f"default bundle built in {time.perf_counter() - t0:.0f} s")
    return out


def camera_bundle(workdir: Path, bundle: Path, mp: str) -> Path:
    """The default bundle calibrated on 160 frames of a camera at mp (JPEG), as a line calibrates on its
    own camera's frames: the frame term reads fine texture, so the same part at another resolution and
    compression is another frame to it. Made once under workdir and reused."""
    if mp == "0.3":
        return bundle
    import shutil

    from diffinspect.scoring.calibrate import calibrate

    out = workdir / f"line-bundle-{mp}mp"
    frames = write_frames(workdir / "line-frames" / f"calibration-{mp}mp", 160, partial(good_frame, mp, 2), "jpg")
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle, tmp)
        calibrate(tmp, frames)
        tmp.rename(out)
    elif read_whole(out):
        calibrate(out, frames)
    return out


def read_whole(bundle: Path) -> bool:
    """Whether the bundle's health profile was calibrated before profiles recorded the scale their frames
    were read at (watch then decodes every frame whole): calibrated again by this bench, a new version."""
    from diffinspect.bundle import Bundle

    health = Bundle.load(bundle, verify=False).manifest.health
    return health is not None and health.read_side is None


def student_bundle(workdir: Path, bundle: Path, iterations: int) -> Path:
    """A copy of the default bundle with a distilled 1-step student as its default sampler, calibrated
    and exported like it (few iterations: only its speed is measured here)."""
    out = workdir / "bundle-student1"
    if has_int8(out):
        return out
    import shutil

    from diffinspect.export import export_bundle
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.train.distill import distill

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out)
    distill(out, steps=1, iterations=iterations)
    calibrate(out, workdir / "line-frames" / "calibration", sampler="student")
    export_bundle(out, "openvino", "int8", sampler="student")
    return out


# -- frames ----------------------------------------------------------------------------------------

DISTINCT = {"0.3": 8, "2": 6, "5": 4}  # good parts per size


def frame_images(mp: str, n: int, seed: int = 0) -> list[np.ndarray]:
    """n distinct RGB frames of good parts of the line at one resolution (4:3; see good_frame)."""
    return [good_frame(mp, seed + 10, i) for i in range(n)]


def with_defect(img: np.ndarray, seed: int) -> np.ndarray:
    """The frame with a gross defect: a dark blot over about a tenth of it. The NG share must be what
    --ng-share asks whatever the bundle's few training steps find, so the defect is one any detector
    flags (the line's subtle synthetic defects need a model trained for minutes)."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    out = img.copy()
    centre = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
    cv2.circle(out, centre, int(0.18 * h), (20, 18, 15), -1, cv2.LINE_AA)
    return out


def defect_at(n: int, share: float) -> set[int]:
    """Which of n frames carry a defect: round(n * share) of them (at least one for a share above 0),
    spread evenly."""
    k = min(n, max(1 if share > 0 else 0, round(n * share)))
    return {int((j + 0.5) * n / k) for j in range(k)}


def encode(img: np.ndarray, fmt: str, color: str) -> bytes:
    """PNG or JPEG (quality 90, what camera SDKs default to) of a frame in colour or gray."""
    pixels = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if color == "gray" else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(f".{fmt}", pixels, params)
    assert ok
    return buf.tobytes()


# -- end to end: the real run_watch ----------------------------------------------------------------

# Each run: the detector pair, the overlay rule and format, the batch, and the lanes (2: the frames split
# over two camera folders, each its own lane and engine on one thread; 1: one lane, the engine on both).
VARIANTS: dict[str, dict] = {
    "int8": {"pair": "int8"},
    "int8 overlays all": {"pair": "int8", "overlays": "all"},
    "int8 overlays all jpg": {"pair": "int8", "overlays": "all", "overlay_format": "jpg"},
    "int8 batch 1": {"pair": "int8", "batch": 1},
    "int8 2 lanes x 1 thread": {"pair": "int8", "lanes": 2},
    "int8 whole decode": {"pair": "whole"},
    "int8-nohealth": {"pair": "nohealth"},
    "copod": {"pair": "copod"},
}


def quiet_watch(folders: list[Path], out: Path, make: Callable, fallback: Callable, opts,  # noqa: ANN001
                per_folder: dict | None = None) -> object:
    """run_watch with its per-frame lines sent nowhere (they are not the benchmark)."""
    from diffinspect.line.watch import run_watch

    devnull = open(os.devnull, "w")  # noqa: SIM115
    stdout, sys.stdout = sys.stdout, devnull
    try:
        return run_watch(folders, out, make, fallback, opts, per_folder=per_folder)
    finally:
        sys.stdout = stdout
        devnull.close()


def backlog(files: list[bytes], ext: str, pairs: list[tuple[Callable, Callable]], root: Path, opts) -> dict:  # noqa: ANN001
    """`inspect watch --once` over the files as a backlog (dealt over one camera folder per pair, each
    its own lane): frames/s from the first frame taken to the last row committed, and the run's time per
    frame by stage."""
    cams = [Path(tempfile.mkdtemp(prefix="cam-", dir=root)) for _ in pairs]
    for i, data in enumerate(files):
        (cams[i % len(cams)] / f"f{i:05d}.{ext}").write_bytes(data)
    s = quiet_watch(cams, cams[0].with_name(cams[0].name + "-out"), *pairs[0], opts,
                    per_folder=dict(zip(cams, pairs, strict=True)))
    return {"fps": s.fps, "frames": s.frames, "ng": s.ng, "error": s.error, "fallback": s.fallback,
            "stages": s.stages}


def steady(files: list[bytes], ext: str, make: Callable, fallback: Callable, root: Path, batch: int,
           rate: float, seconds: float) -> np.ndarray:
    """Latency (ms) from each file's rename into the watched folder to its committed row, with frames
    published at a steady rate (written under a temporary name, then renamed, as cameras should)."""
    from watch import publish_steadily  # bench/watch.py, beside this script

    from diffinspect.line.watch import WatchOptions
    from diffinspect.store.reader import ResultsReader, count_frames

    cam = Path(tempfile.mkdtemp(prefix="feed-", dir=root))
    out = cam.with_name(cam.name + "-out")
    stop = threading.Event()
    opts = WatchOptions(batch=batch, quiet=True, stop=stop)
    watcher = threading.Thread(target=quiet_watch, args=([cam], out, make, fallback, opts))
    watcher.start()
    published: dict[str, float] = {}
    n = max(int(rate * seconds), 1)
    try:
        while not (out / "results.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        published.update(publish_steadily(cam, files, ext, rate, n))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and count_frames(out / "results.db") < n:
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
    with ResultsReader(out / "results.db") as db:
        rows = db.rows()
    return np.array([(r["scored_at"] - published[r["path"]]) * 1000 for r in rows if r["path"] in published])


def detector_pairs(bundle: Path) -> dict[str, list[tuple[Callable, Callable]]]:
    """The (make_detector, make_fallback) pairs of each kind of run, one per lane."""
    from diffinspect.engines.exports import THREADS_ENV
    from diffinspect.scoring.inspector import Inspector

    def pair(health: str = "as calibrated") -> tuple[Callable, Callable]:
        int8, copod = Inspector.load(bundle, backend="openvino", device="cpu"), Inspector.fallback(bundle)
        for insp in (int8, copod):
            if health == "none":  # no drift alarms
                insp.detector.health = None
            elif health == "whole":  # a profile without its read scale: decoded whole (Supervisor.decode_side)
                insp.detector.health = replace(insp.detector.health, read_side=None)
        return (lambda: int8), (lambda: copod)

    int8 = pair()
    log(f"default bundle on {int8[0]().backend} ({int8[0]().detector.engine.precision})")
    copod = int8[1]
    saved = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = "1"  # read when an engine is compiled
    try:
        one_thread = [pair(), pair()]
    finally:
        del os.environ[THREADS_ENV]
        if saved is not None:
            os.environ[THREADS_ENV] = saved
    return {"int8": [int8], "int8 x2": one_thread, "whole": [pair("whole")], "nohealth": [pair("none")],
            "copod": [(copod, copod)]}


def end_to_end(bundle: Path, root: Path, sizes: list[str], formats: list[str], colors: list[str],
               variants: list[str], frames_at: dict[str, int], batch: int, latency_s: float,
               ng_share: float) -> list[dict]:
    from diffinspect.line.watch import WatchOptions

    rows = []
    for mp in sizes:
        pairs = detector_pairs(camera_bundle(root.parent, bundle, mp))
        n = frames_at[mp]
        good = frame_images(mp, DISTINCT[mp])
        bad = defect_at(n, ng_share)
        defective = [with_defect(good[j % len(good)], j) for j in range(min(len(bad), 2))]
        for fmt in formats:
            for color in colors:
                enc_good = [encode(img, fmt, color) for img in good]
                enc_bad = [encode(img, fmt, color) for img in defective]
                files = _in_order(n, bad, enc_good, enc_bad)
                for name in variants:
                    v = VARIANTS[name]
                    lanes = pairs["int8 x2"] if v.get("lanes", 1) == 2 else pairs[v["pair"]]
                    opts = WatchOptions(batch=v.get("batch", batch), once=True, quiet=True, stable_ms=50,
                                        overlays=v.get("overlays", "ng"),
                                        overlay_format=v.get("overlay_format", "png"))
                    r = backlog(files, fmt, lanes, root, opts)
                    first = (fmt, color) == (formats[0], colors[0]) and name in ("int8", "copod")
                    make, fallback = lanes[0]
                    lat = (steady(files, fmt, make, fallback, root, batch, 0.5 * r["fps"], latency_s)
                           if latency_s > 0 and first else np.array([]))
                    p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2
                    r.update(megapixels=mp, format=fmt, color=color, variant=name, detector=v["pair"],
                             defect_share=len(bad) / n, latency_p50_ms=float(p50), latency_p99_ms=float(p99),
                             latency_rate=0.5 * r["fps"], bytes=len(enc_good[0]))
                    rows.append(r)
                    top = max(r["stages"], key=r["stages"].get)
                    log(f"{mp:>4} MP {fmt} {color:<4} {name:<24}: {r['fps']:6.1f} frames/s, NG {r['ng']}/{r['frames']}"
                        f", latency p50 {p50:.0f} ms p99 {p99:.0f} ms; most time: {top} "
                        f"{r['stages'][top]:.1f} ms/frame")
    return rows


def _in_order(n: int, bad: set[int], good: list[bytes], defective: list[bytes]) -> list[bytes]:
    """The backlog's files: a defective frame at each index in bad, good ones (cycled) elsewhere."""
    out, g, d = [], itertools.cycle(good), itertools.cycle(defective)
    for i in range(n):
        out.append(next(d) if i in bad else next(g))
    return out


# -- the limit: MACs per frame and the CPU's peak ----------------------------------------------------


def graph_macs(onnx_path: Path, shapes: dict[str, list[int]]) -> float:
    """Multiply-accumulates per frame of an ONNX graph: Conv (and transposed), MatMul and Gemm, counted
    from the graph read by OpenVINO with its inputs fixed to `shapes` (every shape then static). A graph
    exported with a fixed batch keeps it, and its count is divided by it."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    batch = 1
    if model.inputs[0].get_partial_shape()[0].is_static:
        batch = model.inputs[0].get_partial_shape()[0].get_length()
        shapes = {name: [batch, *shape[1:]] for name, shape in shapes.items()}
    model.reshape({name: ov.PartialShape(shape) for name, shape in shapes.items()})
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "GroupConvolution"):
            out = list(op.get_output_shape(0))
            w = list(op.get_input_shape(1))  # (M, C, k...) or (G, M/G, C/G, k...)
            total += int(np.prod(out)) * int(np.prod(w[1:] if kind == "Convolution" else w[2:]))
        elif kind == "ConvolutionBackpropData":
            x, w = list(op.get_input_shape(0)), list(op.get_input_shape(1))  # x (N, C, ...), w (C, M, k...)
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        elif kind == "MatMul":
            a = list(op.get_input_shape(0))
            k = a[-2] if op.get_transpose_a() else a[-1]
            total += int(np.prod(list(op.get_output_shape(0)))) * k
    return total / batch


def best_rate(fn: Callable[[], None], seconds: float = 1.5) -> float:
    """Calls per second of fn, best of short windows (other jobs on a shared machine only slow it)."""
    fn()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        best = max(best, 1 / (time.perf_counter() - t0))
    return best


def cpu_peak(n: int = 1024) -> dict[str, float]:
    """GMAC/s of an n x n x n matmul: FP32 (numpy's BLAS), INT8 (onnxruntime MatMulInteger, u8 x s8 -> s32)
    and INT8 on OpenVINO (a quantized MatMul, run as an INT8 kernel by its CPU plugin)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    out = {"fp32 numpy": best_rate(lambda: a @ b) * n ** 3 / 1e9}
    out["int8 onnxruntime"] = _ort_int8(n) * n ** 3 / 1e9
    out["int8 openvino"] = _ov_int8(n) * n ** 3 / 1e9
    out["fp32 openvino"] = _ov_fp32(n) * n ** 3 / 1e9
    return out


def _ort_int8(n: int) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from diffinspect.engines.exports import runtime_threads

    w = np.random.default_rng(1).integers(-127, 128, (n, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = runtime_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).integers(0, 256, (n, n), dtype=np.uint8)
    return best_rate(lambda: sess.run(None, {"a": x}))


def _ov_matmul(n: int, quantized: bool):  # noqa: ANN202
    import openvino as ov
    import openvino.opset13 as ops

    from diffinspect.engines.openvino_engine import compile_config

    x = ops.parameter([n, n], np.float32, name="x")
    w = ops.constant(np.random.default_rng(1).standard_normal((n, n)).astype(np.float32))
    if quantized:  # FakeQuantize on both inputs: the CPU plugin runs the MatMul as INT8 (u8 x s8)
        def fq(node, lo: float, hi: float, levels: int = 256):  # noqa: ANN001, ANN202
            lo_c, hi_c = ops.constant(np.float32(lo)), ops.constant(np.float32(hi))
            return ops.fake_quantize(node, lo_c, hi_c, lo_c, hi_c, levels)
        x_in, w_in = fq(x, 0.0, 4.0), fq(w, -4.0, 4.0, 255)
    else:
        x_in, w_in = x, w
    model = ov.Model([ops.matmul(x_in, w_in, False, True)], [x])
    compiled = ov.Core().compile_model(model, "CPU", compile_config("CPU", "int8" if quantized else "fp32"))
    req = compiled.create_infer_request()
    data = np.random.default_rng(2).random((n, n), np.float32) * 4
    return best_rate(lambda: req.infer([data]))


def _ov_int8(n: int) -> float:
    return _ov_matmul(n, True)


def _ov_fp32(n: int) -> float:
    return _ov_matmul(n, False)


# -- peers, and our model, on the same harness -------------------------------------------------------


def peer_exports(workdir: Path, venv: Path, train_images: int) -> dict:
    """anomalib's three models exported in the peer venv (made on first use), once per workdir."""
    report = workdir / "peers" / "exports.json"
    if report.exists():
        return json.loads(report.read_text())
    from peers import peer_python

    python = peer_python(venv)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "nncf", "onnx", "onnxscript"], check=True)
    cal = workdir / "peers" / "calibration.npy"
    cal.parent.mkdir(parents=True, exist_ok=True)
    np.save(cal, np.stack([cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
                           for img in frame_images("0.3", 16, seed=7)]))
    done = subprocess.run([str(python), str(Path(__file__).with_name("peer_export.py")), "--out",
                           str(report.parent), "--frames", str(cal), "--train-images", str(train_images)],
                          check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    report.write_text(done.stdout.strip().splitlines()[-1])
    return json.loads(report.read_text())


class PeerModel:
    """An anomalib OpenVINO IR compiled as our engine compiles ours (f32 hint, latency, our threads),
    for one frame: float32 (1, 3, H, W) in [0, 1], anomalib's normalisation inside the graph."""

    def __init__(self, xml: str, size: tuple[int, int], precision: str) -> None:
        import openvino as ov

        from diffinspect.engines.openvino_engine import compile_config

        core = ov.Core()
        model = core.read_model(xml)
        first = model.inputs[0].get_partial_shape()[0]
        # A graph exported with a fixed batch (anomalib's PatchCore) runs at it: each call is that many frames.
        self.batch = first.get_length() if first.is_static else 1
        model.reshape({model.inputs[0].get_any_name(): [self.batch, 3, *size]})
        self.compiled = core.compile_model(model, "CPU", compile_config("CPU", precision))
        self.request = self.compiled.create_infer_request()
        self.size = size

    def run(self, x: np.ndarray) -> int:
        self.request.infer([x])
        return self.batch

    def score_frame(self, next_frame: Callable[[], np.ndarray]) -> int:
        return self.run(np.concatenate([self.prepare(next_frame()) for _ in range(self.batch)]))

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        x = cv2.resize(frame, self.size[::-1], interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32) / 255.0


def _inspect_next(insp, next_frame: Callable[[], np.ndarray]) -> None:  # noqa: ANN001
    insp.inspect([next_frame()])


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, seconds: float) -> dict[str, float]:
    """Frames per second of each fn (a call is one frame, or as many as it returns), median over rounds
    in which every fn runs once in turn, so load from other jobs hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                done = fn()
                n += done if isinstance(done, int) else 1
            samples[name].append(n / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in samples.items()}


def side_by_side(bundle: Path, peers: dict, jpegs: list[bytes], rounds: int, seconds: float,
                 providers: list[str], student: Path | None = None) -> dict[str, dict]:
    """frames/s of each engine: the graph alone on inputs at its model size, and frame -> score on the
    same JPEG frames (decode, resize, graph; ours: decode and the whole Inspector, frame term included)."""
    from diffinspect.bundle import Bundle
    from diffinspect.data.image import decode_image
    from diffinspect.engines.select import make_engine
    from diffinspect.scoring.diffusion import model_inputs
    from diffinspect.scoring.inspector import Inspector

    frames = [decode_image(b, "rgb") for b in jpegs]
    ours = {"diffinspect INT8 (openvino)": Inspector.load(bundle, backend="openvino", device="cpu")}
    if student is not None:  # the same U-Net, once per frame, as the default recipe's one-step teacher
        ours["diffinspect INT8 1-step student (openvino)"] = Inspector.load(student, backend="openvino",
                                                                             device="cpu", sampler="student")
    for p in providers:  # onnxruntime on other providers (a GPU: --providers cuda,tensorrt; untested here)
        try:
            ours[f"diffinspect FP32 (onnxruntime {p})"] = Inspector.load(bundle, backend="onnxruntime", device=p)
        except Exception as exc:  # not present here: say so, measure the rest
            log(f"  onnxruntime {p}: {exc}")
    fp32 = make_engine(Bundle.load(bundle), "openvino", "cpu", precision="fp32")
    graph: dict[str, Callable[[], object]] = {}
    frame: dict[str, Callable[[], object]] = {}
    info: dict[str, dict] = {}
    cycle = itertools.cycle(jpegs)

    def next_frame() -> np.ndarray:
        return decode_image(next(cycle), "rgb")

    for name, insp in ours.items():
        det = insp.detector
        x = model_inputs(frames[:1], det.preprocess)[0]
        graph[name] = partial(det.engine.run, x, det.stats.mean, det.stats.std)
        frame[name] = partial(_inspect_next, insp, next_frame)
        info[name] = {"input": list(det.preprocess.hw)}
    det = ours["diffinspect INT8 (openvino)"].detector
    graph["diffinspect FP32 (openvino)"] = partial(fp32.run, model_inputs(frames[:1], det.preprocess)[0],
                                                   det.stats.mean, det.stats.std)
    info["diffinspect FP32 (openvino)"] = {"input": list(det.preprocess.hw)}
    for peer, entry in peers.items():
        for precision in ("fp32", "int8"):
            if precision not in entry["files"]:
                continue
            name = f"{peer} {precision.upper()} (openvino)"
            m = PeerModel(entry["files"][precision], tuple(entry["input"]), precision)
            graph[name] = partial(m.run, np.concatenate([m.prepare(frames[0])] * m.batch))
            frame[name] = partial(m.score_frame, next_frame)
            info[name] = {"input": entry["input"]}
    g = interleaved(graph, rounds, seconds)
    f = interleaved(frame, rounds, seconds)
    return {name: {**info[name], "graph_fps": g[name], "frame_fps": f.get(name)} for name in graph}


# -- the report ------------------------------------------------------------------------------------


def limit_rows(bundle: Path, peers: dict, speeds: dict[str, dict], peak: dict[str, float]) -> list[dict]:
    """Each engine's MACs per frame, the GMAC/s its graph reaches, and that as a share of the peak of
    its precision measured in the same run."""
    from diffinspect.bundle import Bundle
    from diffinspect.data.image import input_hw

    prep = Bundle.load(bundle, verify=False).manifest.preprocess
    h, w = input_hw(prep.image_size)
    c = 3 if prep.color == "rgb" else 1
    ours = graph_macs(Bundle.load(bundle, verify=False).file("model.onnx"), {"frames": [1, h, w, c]})
    macs = {name: ours for name in speeds if name.startswith("diffinspect")}
    for peer, entry in peers.items():
        if "onnx" in entry["files"]:
            import onnx

            first = onnx.load(entry["files"]["onnx"], load_external_data=False).graph.input[0].name
            n = graph_macs(Path(entry["files"]["onnx"]), {first: [1, 3, *entry["input"]]})
            macs.update({name: n for name in speeds if name.startswith(peer)})
    int8_peak = max(v for k, v in peak.items() if k.startswith("int8"))
    fp32_peak = max(v for k, v in peak.items() if k.startswith("fp32"))
    rows = []
    for name, s in speeds.items():
        if name not in macs:
            continue
        rate = macs[name] * s["graph_fps"] / 1e9
        top = int8_peak if "INT8" in name else fp32_peak
        rows.append({"engine": name, "gmac_per_frame": macs[name] / 1e9, "gmac_per_s": rate,
                     "share_of_peak": rate / top, "peak": "int8" if "INT8" in name else "fp32"})
    return rows


SIZING = ("int8", "int8 overlays all", "int8-nohealth", "copod")  # the runs of the sizing table


def sizing(rows: list[dict], cores: int) -> list[dict]:
    """Cameras one core carries at a few camera rates, from the end-to-end frames/s on `cores` cores."""
    out = []
    for r in rows:
        if r["format"] != "jpg" or r["color"] != "rgb" or r["variant"] not in SIZING:
            continue
        per_core = r["fps"] / cores
        out.append({"megapixels": r["megapixels"], "variant": r["variant"], "fps_per_core": per_core,
                    **{f"cameras_at_{fps}": int(per_core // fps) for fps in (1, 2, 5, 10)}})
    return out


def print_report(e2e: list[dict], speeds: dict, limits: list[dict], peak: dict, cores: int) -> None:
    print(f"\nend to end: inspect watch --once backlog on {cores} cores; latency: steady feed at half that rate")
    print(f"{'MP':>4} {'file':<4} {'colour':<6} {'run':<24} {'frames/s':>8} {'NG':>7} {'p50 ms':>7} {'p99 ms':>7}  "
          "ms per frame by stage")
    for r in e2e:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        ng = f"{r['ng']}/{r['frames']}"
        print(f"{r['megapixels']:>4} {r['format']:<4} {r['color']:<6} {r['variant']:<24} {r['fps']:8.1f} {ng:>7} "
              f"{r['latency_p50_ms']:7.0f} {r['latency_p99_ms']:7.0f}  {stages}")
    if speeds:
        print("\nside by side (same harness, same frames; graph: model input ready; frame: JPEG 0.3 MP -> score)")
        print(f"{'engine':<36} {'input':>9} {'graph f/s':>9} {'frame f/s':>9}")
        for name, s in speeds.items():
            frame = f"{s['frame_fps']:9.1f}" if s.get("frame_fps") else f"{'-':>9}"
            print(f"{name:<36} {'x'.join(map(str, s['input'])):>9} {s['graph_fps']:9.1f} {frame}")
    print("\nthe limit: CPU peak in this run (GMAC/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    print(f"{'engine':<36} {'GMAC/frame':>10} {'GMAC/s':>8} {'share of peak':>14}")
    for r in limits:
        print(f"{r['engine']:<36} {r['gmac_per_frame']:10.3f} {r['gmac_per_s']:8.2f} "
              f"{100 * r['share_of_peak']:9.1f} % {r['peak']}")


def targets(e2e: list[dict], speeds: dict, limits: list[dict]) -> dict[str, bool | None]:
    def fps(mp: str, fmt: str) -> float | None:
        found = [r["fps"] for r in e2e if (r["megapixels"], r["format"], r["color"], r["variant"])
                 == (mp, fmt, "rgb", "int8")]
        return found[0] if found else None

    out: dict[str, bool | None] = {}
    at03, at5 = fps("0.3", "jpg") or fps("0.3", "png"), fps("5", "jpg")
    out[">= 100 frames/s end to end at 0.3 MP"] = None if at03 is None else at03 >= 100
    out[">= 25 frames/s end to end at 5 MP JPEG"] = None if at5 is None else at5 >= 25
    peers = [s["graph_fps"] for n, s in speeds.items() if not n.startswith("diffinspect")]
    ours = speeds.get("diffinspect INT8 (openvino)")
    out[">= 2x the fastest peer (graph)"] = None if not peers or not ours else ours["graph_fps"] >= 2 * max(peers)
    share = [r["share_of_peak"] for r in limits if r["engine"] == "diffinspect INT8 (openvino)"]
    out["model stage >= 30 % of INT8 peak"] = None if not share else share[0] >= 0.3
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "diffinspect-throughput")
    p.add_argument("--train-steps", type=int, default=40,
                   help="of the default bundle (speed needs few; good frames pass at any, by the calibration)")
    p.add_argument("--sizes", default="0.3,2,5", help=f"megapixels, of {', '.join(MEGAPIXELS)}")
    p.add_argument("--formats", default="jpg", help="of the frame files: jpg, png")
    p.add_argument("--colors", default="rgb", help="of the frame files: rgb, gray (the bundle is colour)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="runs, of: " + ", ".join(VARIANTS))
    p.add_argument("--ng-share", type=float, default=0.03,
                   help="share of the frames that carry a defect (the rest are good parts)")
    p.add_argument("--frames", default="0.3:200,2:48,5:32", help="frames per backlog run, per size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latency-seconds", type=float, default=4.0,
                   help="steady feed per run of the first format and colour (0: none)")
    p.add_argument("--peers", action="store_true", help="anomalib's EfficientAD-S, PaDiM, PatchCore too")
    p.add_argument("--peer-venv", type=Path, default=Path("/work/peer-venv"))
    p.add_argument("--train-images", type=int, default=200, help="PatchCore's memory bank: of this many images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.5, help="per engine per round")
    p.add_argument("--student", type=int, default=0, metavar="ITERATIONS",
                   help="also time a 1-step student distilled for this many iterations (speed only)")
    p.add_argument("--providers", default="", help="onnxruntime devices to add, e.g. cuda,tensorrt (untested)")
    p.add_argument("--json", type=Path, help="write every figure here")
    a = p.parse_args()

    from diffinspect.engines.exports import available_cores

    a.workdir.mkdir(parents=True, exist_ok=True)
    cores = available_cores()
    bundle = default_bundle(a.workdir, a.train_steps)
    frames_at = {k: int(v) for k, v in (kv.split(":") for kv in a.frames.split(","))}
    with tempfile.TemporaryDirectory(prefix="throughput-", dir=a.workdir) as tmp:
        e2e = end_to_end(bundle, Path(tmp), a.sizes.split(","), a.formats.split(","), a.colors.split(","),
                         a.variants.split(","), frames_at, a.batch, a.latency_seconds, a.ng_share)
    peers = peer_exports(a.workdir, a.peer_venv, a.train_images) if a.peers else {}
    jpegs = [encode(img, "jpg", "rgb") for img in frame_images("0.3", 8, seed=3)]
    providers = [x for x in a.providers.split(",") if x]
    student = student_bundle(a.workdir, bundle, a.student) if a.student else None
    speeds = side_by_side(bundle, peers, jpegs, a.rounds, a.seconds, providers, student)
    peak = cpu_peak()
    limits = limit_rows(bundle, peers, speeds, peak)
    print_report(e2e, speeds, limits, peak, cores)
    met = targets(e2e, speeds, limits)
    verdicts = (f"{k}: {'n/a' if v is None else 'met' if v else 'NOT met'}" for k, v in met.items())
    print("\ntargets: " + "; ".join(verdicts))
    table = sizing(e2e, cores)
    print("\nsizing (cameras one core carries at a camera rate of 1 / 2 / 5 / 10 frames/s):")
    for r in table:
        print(f"  {r['megapixels']:>4} MP JPEG {r['variant']:<18}: {r['fps_per_core']:6.1f} frames/s per core -> "
              f"{r['cameras_at_1']} / {r['cameras_at_2']} / {r['cameras_at_5']} / {r['cameras_at_10']}")
    if a.json:
        a.json.write_text(json.dumps({"cores": cores, "end_to_end": e2e, "side_by_side": speeds, "limit": limits,
                                      "peak_gmac_s": peak, "targets": met, "sizing": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
