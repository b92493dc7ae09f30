"""A lane of `inspect watch`: the folders that share one detector pair, and three threads that hand
over at most one batch each: prep (read + decode) -> score (supervisor) -> commit (committer).

So decoded frames in memory are bounded by about 4 batches per lane whatever the burst; a burst waits
as file names in the intake, not as pixels.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from diffinspect.data.image import ImageError, decode_image, header_size
from diffinspect.line.commit import Committer
from diffinspect.line.drift import DriftHub
from diffinspect.line.frame import Candidate, FrameChanged, Item, looks_complete, read_frame
from diffinspect.line.options import WatchOptions
from diffinspect.line.products import Bundle, Products, Route
from diffinspect.line.say import describe
from diffinspect.line.supervisor import Supervisor
from diffinspect.scoring.stages import DECODE, HEALTH, StageClock

log = logging.getLogger(__name__)


class FrameQueue(queue.Queue):
    """The bounded scoring queue of one lane (file names only), with its high-water mark."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.high_water = 0

    def _put(self, item: Candidate) -> None:  # called under the queue's mutex
        super()._put(item)
        self.high_water = max(self.high_water, len(self.queue))


@dataclass
class LaneShared:
    """What the lanes of one run share."""

    opts: WatchOptions
    committer: Committer
    recheck: Callable[[Candidate, bool], None]  # hand a frame back to the intake (changed, or half-written)
    started: Callable[[], None]  # the first frame is taken (for the rate)
    stop_taking: threading.Event = field(default_factory=threading.Event)
    pool: ThreadPoolExecutor | None = None
    drift: DriftHub | None = None  # frame health and drift alarms
    products: Products | None = None  # [watch.products]: a frame's product picks its bundle
    clock: StageClock = field(default_factory=StageClock)  # time by stage, for the summary

    def __post_init__(self) -> None:
        if self.opts.decode_workers > 1:
            self.pool = ThreadPoolExecutor(self.opts.decode_workers, thread_name_prefix="watch-decode")
        mp = self.opts.max_megapixels
        # Refuse files no frame within the limit could need (16-bit RGBA, uncompressed) before reading.
        self.max_bytes = None if mp is None else int(mp * 1e6 * 8) + (16 << 20)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


class Lane:
    def __init__(self, folders: list[Path], frames: FrameQueue, supervisor: Supervisor | None,
                 shared: LaneShared) -> None:
        """supervisor: the folders' own detector pair; None when only products' bundles score their frames."""
        self.folders, self.queue, self.supervisor, self.shared = folders, frames, supervisor, shared
        self.bundle = Bundle(supervisor) if supervisor is not None else None
        self.drift = shared.drift.lane(folders) if shared.drift is not None else None
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
                log.warning(f"{t.name} did not finish within {timeout:g} s; leaving it")
                return

    # -- prep: read + decode, just before scoring (the intake only holds names) ----------------

    def _prep(self) -> None:
        sh = self.shared
        try:
            while not sh.stop_taking.is_set():
                cands = self._take_batch()
                if not cands:
                    continue
                sh.started()
                if sh.pool is not None and len(cands) > 1:
                    loaded = list(sh.pool.map(self._load, cands))
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
        opts = self.shared.opts
        deadline = time.monotonic() + opts.batch_wait_ms / 1000
        while len(cands) < opts.batch:
            try:
                cands.append(self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4)))
            except queue.Empty:
                break
        return cands

    def _route(self, cand: Candidate) -> Route:
        products = self.shared.products
        return Route(None, self.bundle) if products is None else products.route(cand, self.bundle)

    def _load(self, cand: Candidate) -> Item | None:
        """The decoded frame (or an error or held item) with its product and bundle, or None when the
        frame went back to the intake."""
        route = self._route(cand)
        item = self._read(cand, None if route.bundle is None else route.bundle.supervisor)
        if item is not None:
            item.product, item.bundle, item.held = route.product, route.bundle, route.held
        return item

    def _read(self, cand: Candidate, supervisor: Supervisor | None) -> Item | None:
        sh = self.shared
        t0 = time.perf_counter()
        try:
            data = read_frame(cand, sh.max_bytes)
        except FrameChanged:
            sh.recheck(cand, False)
            return None
        except ImageError as exc:
            return Item(cand, error=str(exc))
        if not cand.settled and not looks_complete(data):
            sh.recheck(cand, True)  # half-written: never decoded
            return None
        side = None if supervisor is None else supervisor.decode_side
        try:
            color = supervisor.color if supervisor is not None else "rgb"
            frame = decode_image(data, color, sh.opts.max_megapixels, side)
        except Exception as exc:  # ImageError, or OpenCV raising on an exotic file
            if data and not cand.settled:
                # Maybe a writer that closes after every chunk (TIFF has no end marker to check):
                # the error row waits until the file has stayed unchanged for settle_ms.
                sh.recheck(cand, True)
                return None
            reason = str(exc) if isinstance(exc, ImageError) else f"cannot decode: {describe(exc)}"
            return Item(cand, error=reason)
        t1 = time.perf_counter()
        health = (None if self.drift is None or supervisor is None
                  else self.drift.measure(cand.key, frame, supervisor.health))
        sh.clock.add(DECODE, t1 - t0)
        sh.clock.add(HEALTH, time.perf_counter() - t1)
        width, height = header_size(data) if side else frame.shape[1::-1]
        shape = None if (height, width) == frame.shape[:2] else (height, width, frame.shape[2])
        return Item(cand, frame=frame, health=health, shape=shape)

    # -- score ---------------------------------------------------------------------------------

    def _score(self) -> None:
        try:
            while (items := self._scoring.get()) is not None:
                self._score_batch(items)
                for it in items:
                    if not self.shared.committer.wants_overlay(it):
                        it.frame = None  # keep pixels only as long as needed
                self._committing.put(items)
        finally:
            self._committing.put(None)

    def _score_batch(self, items: list[Item]) -> None:
        todo = [it for it in items if it.error is None and it.held is None]
        try:
            for bundle in dict.fromkeys(it.bundle for it in todo):  # each bundle once, in frame order
                with bundle.lock:
                    bundle.supervisor.score([it for it in todo if it.bundle is bundle], self.shared.clock)
            if self.drift is not None:
                for by in {id(it.by): it.by for it in todo if it.by is not None}.values():
                    self.drift.scored_by(by.name, by.guarantee)
        except Exception as exc:  # a bug here must cost rows, not the line
            log.warning(f"scoring: {describe(exc)}")
            for it in todo:
                if it.verdict is None and it.error is None:
                    it.error = f"internal error while scoring: {describe(exc)}"

    # -- commit --------------------------------------------------------------------------------

    def _commit(self) -> None:
        while (items := self._committing.get()) is not None:
            self.shared.committer.commit(items)
