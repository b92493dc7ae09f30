"""`inspect watch`: score every frame the cameras drop, exactly once, without ever stopping the line.

    watchdog events ─┐
    periodic rescan ─┴→ Intake (one thread: completeness checks, oldest first)
                          → FrameQueue (bounded: paths only) → per lane: prep (read + decode)
                          → score (diffusion, or the COPOD fallback) → commit (overlays, SQLite + JSONL,
                          then move/delete)

A lane is a group of folders sharing one detector pair (one per camera bundle). The three lane stages
hand over at most one batch each, so decoded frames in memory are bounded by about 4 batches per
lane whatever the burst; a burst waits as file names in the intake, not as pixels.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffinspect import DiffinspectError
from diffinspect.data.image import ImageError, decode_image
from diffinspect.line.intake import (
    Candidate,
    FrameChanged,
    FrameQueue,
    Intake,
    IntakeConfig,
    dispose,
    looks_complete,
    make_handler,
    overlay_name,
    read_frame,
)
from diffinspect.line.outbox import Outbox, Output
from diffinspect.line.results import FrameRow, ResultStore
from diffinspect.scoring.detector import Detector, label_for

DetectorFactory = Callable[[], Detector]
# (path, frame uint8 (H, W, C), map on the frame's pixel grid or None, score, threshold, label,
#  pixel_threshold) -> None
OverlayWriter = Callable[[Path, np.ndarray, "np.ndarray | None", float, float, str, "float | None"], None]


@dataclass
class WatchOptions:
    batch: int = 8
    overlays: str = "ng"  # ng | all | none
    after: str = "keep"  # keep | move | delete (only after the frame's row is committed)
    recursive: bool = False
    pattern: str | None = None  # glob on the file name (case-insensitive); None: image suffixes
    once: bool = False  # score the backlog, then return
    quiet: bool = False  # plain log lines (service mode) instead of the live view
    max_latency_ms: float | None = None  # frames that would miss it are scored by the fallback
    max_megapixels: float | None = 50.0
    stable_ms: float = 300.0  # size + mtime unchanged this long = complete (without a close event)
    empty_ms: float = 5000.0  # a zero-byte file this old gets an error row
    settle_ms: float = 2000.0  # a PNG/JPEG/BMP without its end marker is re-read after this quiet
    retry_seconds: float = 60.0  # re-create a failed diffusion detector (and a failed fallback)
    queue_size: int = 256  # bounded scoring queue (file names) per lane
    batch_wait_ms: float = 3.0  # how long a partial batch waits for more frames
    rescan_seconds: float = 5.0  # safety net for missed file events
    score_timeout_s: float | None = 120.0  # a diffusion call hung this long counts as failed
    decode_workers: int = 2
    stop: threading.Event | None = None  # set it to stop (tests, embedding)

    def validate(self) -> None:
        checks = [
            (self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
            (self.overlays in ("ng", "all", "none"),
             f"overlays must be ng, all or none, got {self.overlays!r}"),
            (self.after in ("keep", "move", "delete"),
             f"after must be keep, move or delete, got {self.after!r}"),
            (self.queue_size >= self.batch, f"queue size ({self.queue_size}) must be at least the batch "
                                            f"({self.batch})"),
            (self.max_latency_ms is None or self.max_latency_ms > 0, "max latency must be positive"),
            (self.max_megapixels is None or self.max_megapixels > 0, "max megapixels must be positive"),
            (min(self.stable_ms, self.empty_ms, self.settle_ms, self.batch_wait_ms) >= 0,
             "waiting times cannot be negative"),
            (self.retry_seconds > 0 and self.rescan_seconds > 0, "retry and rescan periods must be positive"),
            (self.decode_workers >= 1, "decode workers must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise DiffinspectError(message)


@dataclass
class WatchSummary:
    scored: int  # frames with a score (ok + ng)
    ok: int
    ng: int
    error: int
    fallback: int  # of the scored frames, those scored by the fallback
    fps: float  # rows per second, first frame taken to last row committed
    latency_p50_ms: float | None  # first seen -> row written, over the last 100,000 frames
    latency_p99_ms: float | None
    max_queue_depth: int  # high-water mark of the bounded scoring queues
    elapsed_s: float

    @property
    def frames(self) -> int:
        return self.scored + self.error


def run_watch(folders: Sequence[Path], out: Path, make_detector: DetectorFactory,
              make_fallback: DetectorFactory, options: WatchOptions | None = None, *,
              per_folder: Mapping[Path, tuple[DetectorFactory, DetectorFactory]] | None = None,
              overlay_writer: OverlayWriter | None = None, outputs: Sequence[Output] = ()) -> WatchSummary:
    """Watch folders (one per camera) and commit one row per frame to OUT/results.db (+ .jsonl).

    per_folder gives a folder its own (make_detector, make_fallback), e.g. from a TOML config.
    overlay_writer defaults to diffinspect.scoring.overlay (render_overlay + write_overlay).
    outputs (MQTT, OPC UA) get every committed row through the outbox (line/outbox.py); scoring never
    waits for them.
    Returns after SIGINT/SIGTERM (the batch in flight is committed), options.stop, or with
    options.once when the backlog is done. Raises DiffinspectError for unusable arguments only."""
    opts = options or WatchOptions()
    opts.validate()
    roots = _check_folders(folders)
    per_folder = {Path(os.path.abspath(k)): v for k, v in (per_folder or {}).items()}
    unknown = [str(k) for k in per_folder if k not in roots]
    if unknown:
        raise DiffinspectError(f"per-folder detectors given for folders not watched: {', '.join(unknown)}")
    out = Path(os.path.abspath(out))
    started = time.monotonic()
    say = _Say(opts.quiet)
    store = ResultStore(out)
    outbox = Outbox(store.db_path, outputs, say.warn, say.info).start() if outputs else None
    try:
        return _run(roots, out, store, say, make_detector, make_fallback, per_folder, overlay_writer, opts,
                    started, outbox)
    finally:
        if outbox is not None:
            outbox.stop()  # after the last commit: a few seconds to deliver it while the receiver is up
        store.close()


def _run(roots: list[Path], out: Path, store: ResultStore, say: _Say, make_detector: DetectorFactory,
         make_fallback: DetectorFactory, per_folder: Mapping[Path, tuple[DetectorFactory, DetectorFactory]],
         overlay_writer: OverlayWriter | None, opts: WatchOptions, started: float,
         outbox: Outbox | None = None) -> WatchSummary:
    if store.reconciled:
        say.info(f"results.jsonl: {store.reconciled} row(s) restored from results.db")
    if opts.overlays != "none" and overlay_writer is None:
        overlay_writer = _default_overlay_writer(say)
    (out / "overlays").mkdir(exist_ok=True)
    ctx = _Context(opts, out, store, _Stats(), say, overlay_writer, outbox=outbox)
    lanes = _make_lanes(roots, make_detector, make_fallback, per_folder, ctx)
    intake = Intake(roots, out, IntakeConfig(opts.pattern, opts.recursive, opts.stable_ms, opts.empty_ms,
                                             opts.settle_ms, opts.rescan_seconds, opts.once, opts.after),
                    store, {root: lane.queue for lane in lanes for root in lane.folders}, say.warn)
    ctx.intake = intake
    stop = threading.Event()
    restore_signals = _install_signal_handlers(stop)
    events = _Events(roots, intake, opts, say)
    intake_thread = threading.Thread(target=intake.run, name="watch-intake", daemon=True)
    try:
        for lane in lanes:
            lane.supervisor.start()
        if not opts.once:
            events.start()  # before the scan, so no file falls between the two
        intake.scan()  # the backlog, oldest first
        intake_thread.start()
        for lane in lanes:
            lane.start()
        _wait(stop, opts, intake, events, _View(ctx, lanes, roots) if not opts.quiet else None)
    finally:
        ctx.stop_taking.set()  # prep stops taking frames; batches in flight are scored and committed
        intake.halt()
        events.stop()
        for lane in lanes:
            lane.join(timeout=(opts.score_timeout_s or 60.0) + 30.0)
        if intake_thread.is_alive():
            intake_thread.join(timeout=5)
        if ctx.pool is not None:
            ctx.pool.shutdown(wait=False)
        restore_signals()
    return ctx.stats.summary(max(lane.queue.high_water for lane in lanes), time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# Shared state


class _Say:
    """Warnings and (in quiet mode) one line per frame; safe from any thread."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True)
        self._lock = threading.Lock()
        self._once: set[str] = set()

    def warn(self, msg: str) -> None:
        if self.quiet:
            self._line(sys.stderr, f"{_now()} WARNING {msg}")
        else:
            self.console.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._once:
            self._once.add(key)
            self.warn(msg)

    def info(self, msg: str) -> None:
        if self.quiet:
            self._line(sys.stderr, f"{_now()} INFO {msg}")
        else:
            self.console.print(msg, highlight=False, soft_wrap=True)

    def rows(self, rows: list[FrameRow]) -> None:
        if not self.quiet or not rows:
            return
        lines = []
        for r in rows:
            if r.status == "error":
                what = f"error  {r.error}"
            else:
                via = f" [fallback: {r.fallback_reason}]" if r.fallback_reason else ""
                what = (f"{r.status:<6} score={r.score:.4f} thr={r.threshold:.4f} "
                        f"{r.detector}/{r.backend}{via}")
            lines.append(f"{_now(r.scored_at)} {what} {r.latency_ms:.0f}ms {r.path}")
        self._line(sys.stdout, "\n".join(lines))

    def _line(self, stream, text: str) -> None:  # noqa: ANN001
        with self._lock:
            stream.write(text + "\n")
            stream.flush()


def _now(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"ok": 0, "ng": 0, "error": 0}
        self.fallback = 0
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.recent: deque[tuple[float, int]] = deque()  # (time, rows) over the last 10 s
        self.first: float | None = None
        self.last: float | None = None
        self.last_ng: str | None = None

    def started(self) -> None:
        with self._lock:
            if self.first is None:
                self.first = time.monotonic()

    def record(self, rows: list[FrameRow]) -> None:
        now = time.monotonic()
        with self._lock:
            for r in rows:
                self.counts[r.status] += 1
                self.fallback += r.status != "error" and r.fallback_reason is not None
                self.latencies.append(r.latency_ms or 0.0)
                if r.status == "ng":
                    self.last_ng = r.path
            self.last = now
            self.recent.append((now, len(rows)))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def rate(self) -> float:
        with self._lock:
            if not self.recent:
                return 0.0
            span = max(time.monotonic() - self.recent[0][0], 1.0)
            return sum(n for _, n in self.recent) / span

    def percentiles(self, last: int | None = None) -> tuple[float | None, float | None]:
        with self._lock:
            lat = list(self.latencies)[-last:] if last else list(self.latencies)
        if not lat:
            return None, None
        p50, p99 = np.percentile(np.asarray(lat), [50, 99])
        return float(p50), float(p99)

    def summary(self, max_queue: int, elapsed: float) -> WatchSummary:
        p50, p99 = self.percentiles()
        c = self.counts
        rows = sum(c.values())
        span = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        return WatchSummary(scored=c["ok"] + c["ng"], ok=c["ok"], ng=c["ng"], error=c["error"],
                            fallback=self.fallback, fps=rows / span if span > 0 else 0.0,
                            latency_p50_ms=p50, latency_p99_ms=p99, max_queue_depth=max_queue,
                            elapsed_s=elapsed)


@dataclass
class _Context:
    opts: WatchOptions
    out: Path
    store: ResultStore
    stats: _Stats
    say: _Say
    overlay_writer: OverlayWriter | None
    intake: Intake | None = None
    outbox: Outbox | None = None
    stop_taking: threading.Event = field(default_factory=threading.Event)
    pool: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        if self.opts.decode_workers > 1:
            self.pool = ThreadPoolExecutor(self.opts.decode_workers, thread_name_prefix="watch-decode")
        mp = self.opts.max_megapixels
        # Refuse files no frame within the limit could need (16-bit RGBA, uncompressed) before reading.
        self.max_bytes = None if mp is None else int(mp * 1e6 * 8) + (16 << 20)


# ---------------------------------------------------------------------------------------------
# Detectors


class _Caller:
    """Runs a backend's calls on its own daemon thread so a hung call can be abandoned: Python cannot
    kill a thread, but the line can stop waiting for it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="watch-diffusion", daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, box, done = job
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller, like a future
                box["error"] = exc
            done.set()

    def call(self, fn: Callable, args: tuple, timeout: float | None):  # noqa: ANN201
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, args, box, done))
        if not done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        self._jobs.put(None)


@dataclass
class _Item:
    cand: Candidate
    frame: np.ndarray | None = None
    error: str | None = None
    det: Detector | None = None
    score: float | None = None
    status: str = "error"
    amap: np.ndarray | None = None
    fallback_reason: str | None = None


class _Supervisor:
    """Keeps a diffusion detector when it can and the fallback always: a failing or hung backend
    costs a warning and a re-creation attempt after retry_seconds, never a frame."""

    def __init__(self, make_primary: DetectorFactory, make_fallback: DetectorFactory, ctx: _Context) -> None:
        self._make_primary, self._make_fallback = make_primary, make_fallback
        self._opts, self._say = ctx.opts, ctx.say
        self._lock = threading.Lock()
        self.primary: Detector | None = None
        self._caller: _Caller | None = None
        self.down = "not loaded yet"
        self._retry_at = 0.0
        self._loading = False
        self.fallback: Detector | None = None
        self._fb_down = "not loaded yet"
        self._fb_retry_at = 0.0
        self._est_s = 0.0  # recent diffusion time per batch, for max-latency routing

    def start(self) -> None:
        """Load both detectors. A diffusion load that hangs (a wedged accelerator) is left to finish
        in the background after score_timeout_s while the fallback scores frames."""
        self._fallback_now()
        self._loading, self.down = True, "diffusion detector still loading"
        loader = threading.Thread(target=self._load_primary, name="watch-load", daemon=True)
        loader.start()
        loader.join(self._opts.score_timeout_s)
        if loader.is_alive():
            self._say.warn(f"diffusion detector not loaded after {self._opts.score_timeout_s:g} s; "
                           f"the fallback scores frames until it is")

    @property
    def color(self) -> str:
        det = self.primary or self.fallback
        return det.preprocess.color if det is not None else "rgb"

    def state(self) -> str:
        if self.primary is not None:
            return f"{self.primary.name} ({self.primary.backend})"
        wait = max(0.0, self._retry_at - time.monotonic())
        retry = "loading" if self._loading else f"retry in {wait:.0f} s"
        return f"FALLBACK ({self.down}; {retry})"

    def _load_primary(self) -> None:
        try:
            det = self._make_primary()
        except Exception as exc:
            with self._lock:
                self.down = f"diffusion detector unavailable: {_describe(exc)}"
                self._retry_at = time.monotonic() + self._opts.retry_seconds
                self._loading = False
            self._say.warn(f"{self.down}; the fallback scores frames, "
                           f"retry in {self._opts.retry_seconds:g} s")
            return
        with self._lock:
            self.primary, self._loading = det, False
            self._caller = _Caller() if self._opts.score_timeout_s else None
        self._say.info(f"{det.name} detector ready ({det.backend})")

    def _primary_now(self) -> tuple[Detector | None, _Caller | None]:
        with self._lock:
            if self.primary is None and not self._loading and time.monotonic() >= self._retry_at:
                self._loading = True  # load in the background: the fallback keeps the line going
                threading.Thread(target=self._load_primary, name="watch-reload", daemon=True).start()
            return self.primary, self._caller

    def _fail_primary(self, det: Detector, reason: str) -> None:
        with self._lock:
            if self.primary is not det:
                return
            if self._caller is not None:
                self._caller.close()
            self.primary, self._caller, self.down = None, None, reason
            self._retry_at = time.monotonic() + self._opts.retry_seconds
        self._say.warn(f"{reason}; the fallback scores frames, re-creating the detector in "
                       f"{self._opts.retry_seconds:g} s")

    def _fallback_now(self) -> Detector | None:
        if self.fallback is None and time.monotonic() >= self._fb_retry_at:
            try:
                self.fallback = self._make_fallback()
            except Exception as exc:
                self._fb_down = _describe(exc)
                self._fb_retry_at = time.monotonic() + self._opts.retry_seconds
                self._say.warn(f"fallback detector unavailable: {self._fb_down}")
        return self.fallback

    def score(self, items: list[_Item]) -> None:
        """Fill in score/status/det (or error) of decoded items."""
        primary, caller = self._primary_now()
        fallback = self._fallback_now()
        now = time.time()
        limit = self._opts.max_latency_ms
        to_primary: list[_Item] = []
        to_fallback: list[_Item] = []
        for it in items:
            if primary is None:
                it.fallback_reason = self.down
                to_fallback.append(it)
            elif (limit is not None and fallback is not None
                  and now + self._est_s > it.cand.received_at + limit / 1000):
                it.fallback_reason = f"latency: diffusion would miss the {limit:g} ms deadline"
                to_fallback.append(it)
            else:
                to_primary.append(it)
        if primary is not None and to_primary:
            t0 = time.monotonic()
            try:
                frames = [_as_color(it.frame, primary.preprocess.color) for it in to_primary]
                if caller is not None:
                    scored = caller.call(primary.score, (frames,), self._opts.score_timeout_s)
                else:
                    scored = primary.score(frames)
                scores, maps = _check_scored(scored, len(frames))
            except Exception as exc:
                reason = f"diffusion detector failed: {_describe(exc)}"
                self._fail_primary(primary, reason)
                for it in to_primary:
                    it.fallback_reason = reason
                to_fallback += to_primary
            else:
                self._est_s = 0.8 * self._est_s + 0.2 * (time.monotonic() - t0)
                for i, it in enumerate(to_primary):
                    if math.isfinite(scores[i]):
                        _assign(it, primary, scores[i], None if maps is None else maps[i])
                    else:
                        it.fallback_reason = "diffusion score not finite"
                        to_fallback.append(it)
        if to_fallback:
            self._score_fallback(to_fallback)

    def _score_fallback(self, items: list[_Item]) -> None:
        det = self._fallback_now()
        if det is None:
            for it in items:
                it.error = f"no detector could score it ({it.fallback_reason}; fallback: {self._fb_down})"
            return
        frames = [_as_color(it.frame, det.preprocess.color) for it in items]
        try:
            scores, maps = _check_scored(det.score(frames), len(frames))
            results = [(s, None if maps is None else maps[i], None) for i, s in enumerate(scores)]
        except Exception as exc:
            self._say.warn_once(f"fallback:{type(exc).__name__}", f"fallback failed on a batch "
                                f"({_describe(exc)}); scoring its frames one by one")
            results = [self._one(det, f) for f in frames]
            if all(err is not None for _, _, err in results):  # the instance is broken: replace it
                self.fallback, self._fb_down = None, results[0][2]
                self._fb_retry_at = time.monotonic() + self._opts.retry_seconds
        for it, (s, amap, err) in zip(items, results, strict=True):
            if err is not None:
                it.error = f"scoring failed ({it.fallback_reason}; fallback: {err})"
            elif not math.isfinite(s):
                it.error = f"scoring failed ({it.fallback_reason}; fallback: score not finite)"
            else:
                _assign(it, det, s, amap)

    @staticmethod
    def _one(det: Detector, frame: np.ndarray) -> tuple[float, np.ndarray | None, str | None]:
        try:
            scores, maps = _check_scored(det.score([frame]), 1)
            return scores[0], None if maps is None else maps[0], None
        except Exception as exc:
            return math.nan, None, _describe(exc)


def _check_scored(scored: object, n: int) -> tuple[list[float], np.ndarray | None]:
    scores = np.asarray(scored.scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != n:
        raise ValueError(f"returned {scores.shape[0]} scores for {n} frames")
    maps = scored.maps
    if maps is not None and len(maps) != n:
        maps = None  # a map we cannot attribute is only an overlay lost; the scores still count
    return [float(s) for s in scores], maps


def _assign(it: _Item, det: Detector, score: float, amap: np.ndarray | None) -> None:
    it.det, it.score, it.amap = det, score, amap
    it.status = label_for(score, det.threshold)


def _as_color(frame: np.ndarray, color: str) -> np.ndarray:
    """Frames are decoded once, in the diffusion model's colour; the fallback may want the other."""
    if color == "rgb" and frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if color == "gray" and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[:, :, None]
    return frame


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Lanes: prep -> score -> commit


class _Lane:
    def __init__(self, folders: list[Path], supervisor: _Supervisor, ctx: _Context) -> None:
        self.folders = folders
        self.supervisor = supervisor
        self.ctx = ctx
        self.queue = FrameQueue(ctx.opts.queue_size)
        self._scoring: queue.Queue = queue.Queue(maxsize=1)
        self._committing: queue.Queue = queue.Queue(maxsize=1)
        self._threads = [threading.Thread(target=t, name=f"watch-{t.__name__[1:]}", daemon=True)
                         for t in (self._prep, self._score, self._commit)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is None:
                return  # never started (start-up failed)
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self.ctx.say.warn(f"{t.name} did not finish within {timeout:g} s; leaving it")
                return

    # -- prep: read + decode, just before scoring (the intake only holds names) ----------------

    def _prep(self) -> None:
        try:
            while not self.ctx.stop_taking.is_set():
                cands = self._take_batch()
                if not cands:
                    continue
                self.ctx.stats.started()
                if self.ctx.pool is not None and len(cands) > 1:
                    loaded = list(self.ctx.pool.map(self._load, cands))
                else:
                    loaded = [self._load(c) for c in cands]
                items = [it for it in loaded if it is not None]
                if items:
                    self._scoring.put(items)
        finally:
            self._scoring.put(None)

    def _take_batch(self) -> list[Candidate]:
        try:
            cands = [self.queue.get(timeout=0.05)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.ctx.opts.batch_wait_ms / 1000
        while len(cands) < self.ctx.opts.batch:
            try:
                cands.append(self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
            except queue.Empty:
                break
        return cands

    def _load(self, cand: Candidate) -> _Item | None:
        intake = self.ctx.intake
        try:
            data = read_frame(cand, self.ctx.max_bytes)
        except FrameChanged:
            intake.recheck(cand, settle=False)
            return None
        except ImageError as exc:
            return _Item(cand, error=str(exc))
        if not cand.settled and not looks_complete(data):
            intake.recheck(cand, settle=True)  # half-written: never decoded
            return None
        try:
            return _Item(cand, frame=decode_image(data, self.supervisor.color, self.ctx.opts.max_megapixels))
        except Exception as exc:  # ImageError, or OpenCV raising on an exotic file
            if data and not cand.settled:
                # Maybe a writer that closes after every chunk (TIFF has no end marker to check):
                # the error row waits until the file has stayed unchanged for settle_ms.
                intake.recheck(cand, settle=True)
                return None
            reason = str(exc) if isinstance(exc, ImageError) else f"cannot decode: {_describe(exc)}"
            return _Item(cand, error=reason)

    # -- score ---------------------------------------------------------------------------------

    def _score(self) -> None:
        try:
            while (items := self._scoring.get()) is not None:
                todo = [it for it in items if it.error is None]
                try:
                    if todo:
                        self.supervisor.score(todo)
                except Exception as exc:  # a bug here must cost rows, not the line
                    self.ctx.say.warn(f"scoring: {_describe(exc)}")
                    for it in todo:
                        if it.det is None and it.error is None:
                            it.error = f"internal error while scoring: {_describe(exc)}"
                for it in items:
                    if not self._wants_overlay(it):
                        it.frame = None  # keep pixels only as long as needed
                self._committing.put(items)
        finally:
            self._committing.put(None)

    # -- commit: overlays, then the row, then move/delete --------------------------------------

    def _commit(self) -> None:
        while (items := self._committing.get()) is not None:
            rows = [self._safe_row(it) for it in items]
            inserted = self._commit_rows(rows)
            if inserted is None:
                continue  # given up while stopping: no rows, the files stay for the next start
            if self.ctx.outbox is not None:
                self.ctx.outbox.wake()
            self.ctx.stats.record(inserted)
            self.ctx.say.rows(inserted)
            fresh = {id(r) for r in inserted}
            for it, row in zip(items, rows, strict=True):
                self._after(it.cand, row, id(row) in fresh)

    def _safe_row(self, it: _Item) -> FrameRow:
        try:
            return self._row(it)
        except Exception as exc:  # a bug must cost this frame a proper result, never its row
            it.error, it.det, it.frame = f"internal error: {_describe(exc)}", None, None
            return self._row(it)

    def _row(self, it: _Item) -> FrameRow:
        c, det = it.cand, it.det
        overlay = self._overlay(it) if it.error is None else None
        return FrameRow(
            path=str(c.path), folder=str(c.folder), size=c.size, mtime=c.mtime_ns / 1e9,
            mtime_ns=c.mtime_ns, status="error" if it.error else it.status,
            score=None if it.error else it.score, threshold=None if it.error else float(det.threshold),
            detector=None if it.error else det.name, backend=None if it.error else det.backend,
            latency_ms=None, overlay=overlay, error=it.error, fallback_reason=it.fallback_reason,
            received_at=c.received_at, scored_at=0.0)

    def _commit_rows(self, rows: list[FrameRow]) -> list[FrameRow] | None:
        attempt = 0
        while True:
            now = time.time()
            for r in rows:
                r.scored_at, r.latency_ms = now, round((now - r.received_at) * 1000, 3)
            try:
                return self.ctx.store.commit(rows)
            except Exception as exc:  # disk full, locked, I/O error: hold the line's results, retry
                attempt += 1
                self.ctx.say.warn_once(f"db:{type(exc).__name__}", f"cannot commit results "
                                       f"({_describe(exc)}); retrying every second")
                if self.ctx.stop_taking.is_set() and attempt >= 3:
                    return None
                time.sleep(1.0)

    def _after(self, cand: Candidate, row: FrameRow, fresh: bool) -> None:
        """Move or delete a committed frame; the intake hears about it whatever happens."""
        after = self.ctx.opts.after
        remains = True
        try:
            if after != "keep":
                status = row.status if fresh else self.ctx.store.status_of(*cand.key) or row.status
                dispose(cand.path, cand.size, cand.mtime_ns, status, after, self.ctx.out)
                remains = False
        except Exception as exc:  # left in place; its row is committed, so it is never re-scored
            self.ctx.say.warn(f"could not {after} {cand.path}: {exc}")
        finally:
            self.ctx.intake.done(cand, remains)

    def _wants_overlay(self, it: _Item) -> bool:
        mode = self.ctx.opts.overlays
        return (it.error is None and self.ctx.overlay_writer is not None
                and (mode == "all" or (mode == "ng" and it.status == "ng")))

    def _overlay(self, it: _Item) -> str | None:
        """Written before the row is committed, so a row's overlay path always exists."""
        if not self._wants_overlay(it) or it.frame is None:
            return None
        path = self.ctx.out / "overlays" / overlay_name(it.cand)
        try:
            amap = None
            if it.amap is not None:  # back onto the frame's pixel grid (ROI, crop, pad undone)
                amap = it.det.preprocess.map_to_frame(np.asarray(it.amap, np.float32), it.frame.shape)
            self.ctx.overlay_writer(path, it.frame, amap, it.score, float(it.det.threshold), it.status,
                                    it.det.pixel_threshold)
        except Exception as exc:
            self.ctx.say.warn_once(f"overlay:{type(exc).__name__}", f"overlay not written ({_describe(exc)})")
            return None
        return str(path)


def _make_lanes(roots: list[Path], make_detector: DetectorFactory, make_fallback: DetectorFactory,
                per_folder: Mapping[Path, tuple[DetectorFactory, DetectorFactory]],
                ctx: _Context) -> list[_Lane]:
    groups: dict[tuple[int, int], tuple[tuple[DetectorFactory, DetectorFactory], list[Path]]] = {}
    for root in roots:
        pair = per_folder.get(root, (make_detector, make_fallback))
        groups.setdefault((id(pair[0]), id(pair[1])), (pair, []))[1].append(root)
    return [_Lane(folders, _Supervisor(pair[0], pair[1], ctx), ctx) for pair, folders in groups.values()]


def _check_folders(folders: Sequence[Path]) -> list[Path]:
    if not folders:
        raise DiffinspectError("no folder to watch")
    roots: list[Path] = []
    for f in folders:
        root = Path(os.path.abspath(f))
        if not root.is_dir():
            raise DiffinspectError(f"folder to watch not found: {f}")
        if root not in roots:
            roots.append(root)
    return roots


def _default_overlay_writer(say: _Say) -> OverlayWriter | None:
    try:
        from diffinspect.scoring.overlay import render_overlay, write_overlay
    except ImportError as exc:
        say.warn(f"overlays disabled: {exc}")
        return None

    def write(path: Path, frame: np.ndarray, amap: np.ndarray | None, score: float, threshold: float,
              label: str, pixel_threshold: float | None) -> None:
        write_overlay(path, render_overlay(frame, amap, score, threshold, label, pixel_threshold))

    return write


# ---------------------------------------------------------------------------------------------
# Events, signals, the main loop and the live view


class _Events:
    """The watchdog observer, restarted if its thread dies (e.g. a watched share unmounted). Without
    events (inotify watch limit reached) rescans alone still find every frame, only later."""

    def __init__(self, roots: list[Path], intake: Intake, opts: WatchOptions, say: _Say) -> None:
        self.roots, self.intake, self.opts, self.say = roots, intake, opts, say
        self.observer = None

    def start(self) -> None:
        from watchdog.observers import Observer

        observer = Observer()
        try:
            handler = make_handler(self.intake)
            for root in self.roots:
                observer.schedule(handler, str(root), recursive=self.opts.recursive)
            observer.start()
        except Exception as exc:
            self.say.warn_once(f"events:{type(exc).__name__}", f"file events unavailable "
                               f"({_describe(exc)}); rescanning every second instead")
            self.intake.cfg.rescan_seconds = min(self.intake.cfg.rescan_seconds, 1.0)
            _stop_quietly(observer)
            return
        self.observer = observer

    def check(self) -> None:
        """Every few seconds: a watched folder deleted and re-created (a share re-mounted) ends its
        emitter thread; start the observer afresh (and rescan for what happened meanwhile)."""
        obs = self.observer
        if obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters)):
            return
        if obs is not None:
            self.say.warn("file events stopped; restarting them")
            _stop_quietly(obs)
            self.observer = None
        self.intake.rescan_soon()
        self.start()

    def stop(self) -> None:
        if self.observer is not None:
            _stop_quietly(self.observer)


def _stop_quietly(observer) -> None:  # noqa: ANN001
    # Stopping with events in flight makes watchdog log "queue_events() called when the thread is
    # inactive" at ERROR level: expected here, and alarming in a service log.
    log = logging.getLogger("watchdog.observers.inotify")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:  # noqa: S110 (it is being discarded either way)
        pass
    finally:
        log.setLevel(level)


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM: stop taking frames and commit the batch in flight. A second signal exits at
    once; that is safe too (rows are committed atomically, unscored frames are taken on restart)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    sigs = [signal.SIGINT, signal.SIGTERM]
    previous = {s: signal.getsignal(s) for s in sigs}

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    for s in sigs:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def _wait(stop: threading.Event, opts: WatchOptions, intake: Intake, events: _Events,
          view: _View | None) -> None:
    def done() -> bool:
        return (stop.is_set() or (opts.stop is not None and opts.stop.is_set())
                or (opts.once and intake.finished.is_set()))

    next_check = time.monotonic() + 5
    live = None
    if view is not None:
        from rich.live import Live

        live = Live(view.table(), console=view.ctx.say.console, refresh_per_second=2, transient=False)
        live.start()
    try:
        while not done():
            stop.wait(0.05 if live is None else 0.25)
            if not opts.once and time.monotonic() >= next_check:
                events.check()
                next_check = time.monotonic() + 5
            if live is not None:
                live.update(view.table())
    finally:
        if live is not None:
            live.update(view.table())
            live.stop()


class _View:
    def __init__(self, ctx: _Context, lanes: list[_Lane], roots: list[Path]) -> None:
        self.ctx, self.lanes, self.roots = ctx, lanes, roots

    def table(self):  # noqa: ANN201
        from rich.table import Table

        s = self.ctx.stats
        p50, p99 = s.percentiles(last=2000)
        c = s.counts
        t = Table(title=f"inspect watch: {', '.join(r.name for r in self.roots)}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("frames", f"{sum(c.values())}")
        t.add_row("OK / NG / error", f"[green]{c['ok']}[/] / [red]{c['ng']}[/] / [yellow]{c['error']}[/]")
        t.add_row("frames/s", f"{s.rate():.1f}")
        t.add_row("latency p50 / p99", "-" if p50 is None else f"{p50:.0f} / {p99:.0f} ms")
        t.add_row("scored by fallback", f"{s.fallback}")
        depth = sum(lane.queue.qsize() for lane in self.lanes)
        t.add_row("queue", f"{depth} / {self.ctx.opts.queue_size * len(self.lanes)}"
                           f" (+{self.ctx.intake.waiting()} waiting)")
        for lane in self.lanes:
            t.add_row(f"detector {', '.join(f.name for f in lane.folders)}", lane.supervisor.state())
        for o in self.ctx.outbox.states() if self.ctx.outbox is not None else []:
            t.add_row(o.name, f"[yellow]{o.error}[/]" if o.error else
                      f"{o.delivered} delivered" + ("" if o.connected else " (connecting)"))
        t.add_row("last NG", s.last_ng or "-")
        return t
