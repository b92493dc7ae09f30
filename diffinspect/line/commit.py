"""The commit stage of `inspect watch`, the one place a frame's row is committed: overlay first, then
the row (one transaction per batch), then the `on_commit` hooks, then the file is kept, moved or
deleted, and the intake hears that the frame is done.

Below the free-space floor (line/retention.py) no overlay is written: the disk's last space is for rows.
A batch that cannot be committed (a disk full for other reasons) is retried every second; with `once`
it is given up after a few tries, its overlays deleted (no row names them), its frames left for the
next start and counted, so `--once` ends and says so instead of waiting for ever."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffinspect.line.disposal import Disposal
from diffinspect.line.frame import Candidate, Item
from diffinspect.line.say import WarnOnce, describe
from diffinspect.scoring.overlay import overlay_name, wants_overlay
from diffinspect.scoring.record import Record
from diffinspect.scoring.stages import COMMIT, MAP, OVERLAY, StageClock
from diffinspect.store.results import ResultStore

# (path, frame uint8 (H, W, C), map on the frame's pixel grid or None, score, threshold, label,
#  pixel_threshold) -> None
OverlayWriter = Callable[[Path, np.ndarray, "np.ndarray | None", float, float, str, "float | None"], None]
CommitHook = Callable[[list[Record]], None]
log = logging.getLogger(__name__)
_GIVE_UP_TRIES = 3  # commit attempts, a second apart, before a stopping or --once watcher gives a batch up


class Committer:
    """Shared by the lanes (each commits from its own thread). on_commit hooks get the rows that were
    new, after their transaction and before their files are moved; a failing hook costs a warning."""

    def __init__(self, store: ResultStore, out: Path, overlays: str, overlay_writer: OverlayWriter | None,
                 disposal: Disposal, done: Callable[[Candidate, bool], None], warn_once: WarnOnce,
                 stopping: threading.Event, *, room: Callable[[], bool] = lambda: True,
                 wrote: Callable[[str], None] = lambda p: None, once: bool = False,
                 clock: StageClock | None = None, overlay_format: str = "png") -> None:
        self.store, self.overlay_dir, self.overlays = store, out / "overlays", overlays
        self.overlay_format = overlay_format
        self.overlay_writer, self.disposal, self.done = overlay_writer, disposal, done
        self.warn_once, self.stopping = warn_once, stopping
        self.room, self.wrote, self.once = room, wrote, once
        self.clock = clock or StageClock()  # overlay and commit time, and the frames done
        self.on_commit: list[CommitHook] = []
        # on_alarm = "hold": why the verdicts of a (camera folder, product) are held now (its open alarms), else None.
        self.held: Callable[[Path, str | None], str | None] | None = None
        self.uncommitted = 0  # frames given up in once mode: they are scored again on the next start
        self._given_up = False

    def commit(self, items: list[Item]) -> None:
        rows = [self._safe_row(it) for it in items]
        t0 = time.perf_counter()
        try:
            self._commit(items, rows)
        finally:
            self.clock.add(COMMIT, time.perf_counter() - t0)
            self.clock.count(len(items))

    def _commit(self, items: list[Item], rows: list[Record]) -> None:
        inserted = self._commit_rows(rows)
        if inserted is None:  # given up: no rows, the files stay for the next start
            for row in rows:
                if row.overlay is not None:
                    with contextlib.suppress(OSError):
                        Path(row.overlay).unlink()
            if self.once and not self.stopping.is_set():
                self.uncommitted += len(items)
                for it in items:
                    self.done(it.cand, True)
            return
        for hook in self.on_commit:
            try:
                hook(inserted)
            except Exception as exc:  # the rows are committed; a hook must not hold up the line
                self.warn_once(log, f"on_commit:{type(exc).__name__}", f"after commit: {describe(exc)}")
        fresh = {id(r) for r in inserted}
        for it, row in zip(items, rows, strict=True):
            self._after(it.cand, row, id(row) in fresh)

    def wants_overlay(self, it: Item) -> bool:
        return (it.error is None and it.verdict is not None and self.overlay_writer is not None
                and wants_overlay(self.overlays, it.verdict.label))

    def _safe_row(self, it: Item) -> Record:
        try:
            return self._row(it)
        except Exception as exc:  # a bug must cost this frame a proper result, never its row
            it.error, it.verdict, it.by, it.frame = f"internal error: {describe(exc)}", None, None, None
            return self._row(it)

    def _row(self, it: Item) -> Record:
        c, v, by = it.cand, it.verdict, it.by
        if it.error is None and it.held is not None:  # not scored: an unknown product
            return Record(path=str(c.path), folder=str(c.folder), size=c.size, mtime=c.mtime_ns / 1e9,
                          mtime_ns=c.mtime_ns, status="hold", score=None, threshold=None, detector=None,
                          backend=None, latency_ms=None, overlay=None, error=None, received_at=c.received_at,
                          scored_at=0.0, hold_reason=it.held, product=it.product)
        if it.error is None and (v is None or by is None):
            it.error = "internal error: no verdict"
        bad = it.error is not None or v.label == "error"
        hold = None if bad or self.held is None else self.held(c.folder, it.product)
        return Record(
            path=str(c.path), folder=str(c.folder), size=c.size, mtime=c.mtime_ns / 1e9,
            mtime_ns=c.mtime_ns, status="error" if bad else "hold" if hold else v.label,
            score=None if bad else v.score, threshold=None if bad else by.threshold,
            detector=None if bad else by.name, backend=None if bad else by.backend,
            latency_ms=None, overlay=None if bad else self._overlay(it), error=it.error or (v.error if bad else None),
            fallback_reason=it.fallback_reason, received_at=c.received_at, scored_at=0.0,
            health=None if bad or it.health is None else it.health.json(),
            p_value=None if bad else v.p_value, hold_reason=hold, product=it.product,
            bundle_version=None if bad else by.version)

    def _overlay(self, it: Item) -> str | None:
        """Written before the row is committed, so a row's overlay path always exists."""
        if not self.wants_overlay(it) or it.frame is None or not self.room():
            return None
        v, by = it.verdict, it.by
        path = self.overlay_dir / overlay_name(*it.cand.key, self.overlay_format)
        try:
            with self.clock.timed(MAP):
                amap = v.map  # made here, on first use
            with self.clock.timed(OVERLAY):
                self.overlay_writer(path, it.frame, amap, v.score, by.threshold, v.label, by.pixel_threshold)
        except Exception as exc:
            self.warn_once(log, f"overlay:{type(exc).__name__}", f"overlay not written ({describe(exc)})")
            with contextlib.suppress(OSError):
                path.unlink()  # a part written before the disk filled is no overlay
            return None
        self.wrote(str(path))
        return str(path)

    def _commit_rows(self, rows: list[Record]) -> list[Record] | None:
        attempt = 0
        while True:
            now = time.time()
            for r in rows:
                r.scored_at, r.latency_ms = now, round((now - r.received_at) * 1000, 3)
            try:
                inserted = self.store.commit(rows)
                self._given_up = False
                return inserted
            except Exception as exc:  # disk full, locked, I/O error: hold the line's results, retry
                attempt += 1
                self.warn_once(log, f"db:{type(exc).__name__}", f"cannot commit results "
                               f"({describe(exc)}); retrying every second")
                # Once a batch was given up, the next ones get one try each until a commit works again.
                if (self.stopping.is_set() or self.once) and (self._given_up or attempt >= _GIVE_UP_TRIES):
                    self._given_up = True
                    return None
                time.sleep(1.0)

    def _after(self, cand: Candidate, row: Record, fresh: bool) -> None:
        """Keep, move or delete a committed frame; the intake hears about it whatever happens."""
        remains = True
        try:
            if self.disposal.after != "keep":
                status = row.status if fresh else self.store.status_of(*cand.key) or row.status
                remains = self.disposal(cand.path, cand.size, cand.mtime_ns, status)
        except Exception as exc:  # left in place; its row is committed, so it is never re-scored
            log.warning(f"could not {self.disposal.after} {cand.path}: {exc}")
        finally:
            self.done(cand, remains)
