"""Retention of `inspect watch` ([watch.retention]): old rows to the archive, our files within the disk
budget, and the free-space floor, so a line can run for months on one disk.

- Rows older than `days` leave results.db once every configured output acknowledged them, archived first
  (store/retention.py), in small transactions so a commit never waits for more than one of them.
- Overlays and moved frames (only those: OUT/overlays, OUT/ok|ng|error) are deleted oldest first while
  they take more than `disk_gb` or the free space is below `min_free_gb`. The ledger of those files is
  one listing at start, then every file the committer writes, so a pass never walks the folders again.
- Below the floor the watcher writes no overlays and moves no frames (rows are always recorded); it says
  so once (console, an event the station shows and MQTT publishes) and resumes by itself when space returns.

All of it runs in one thread of the watcher at a low rate; the floor check the committer makes before each
overlay or move is one statvfs call.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from diffinspect.config import RetentionSettings
from diffinspect.line.disposal import OUTPUT_SUBDIRS
from diffinspect.line.say import WarnOnce, describe
from diffinspect.store.results import ResultStore

log = logging.getLogger(__name__)
GB = 1 << 30
_STEP_PAUSE_S = 0.01  # between transactions: commits get the store's lock in between


class Space:
    """The free-space floor of OUT, asked before each overlay and move (any thread)."""

    def __init__(self, out: Path, min_free_gb: float, store: ResultStore, warn_once: WarnOnce) -> None:
        self.out, self.floor = out, int(min_free_gb * GB)
        self.store, self.warn_once = store, warn_once
        self.low = False  # below the floor: what the station and the summary read
        self._lock = threading.Lock()

    @property
    def margin(self) -> int:
        """How far above the floor the watcher resumes, so a disk hovering at it does not flap."""
        return max(self.floor // 10, 1 << 20)

    def free(self) -> int:
        st = os.statvfs(self.out)
        return st.f_bavail * st.f_frsize

    def room(self) -> bool:
        """True while OUT has more free space than the floor; says so once when that changes."""
        try:
            free = self.free()
        except OSError:
            return True  # cannot tell: the write itself will say what is wrong
        low = free < self.floor + (self.margin if self.low else 0)
        if low != self.low:
            self._changed(low, free)
        return not low

    def _changed(self, low: bool, free: int) -> None:
        with self._lock:
            if low == self.low:
                return
            self.low = low
        floor = f"{self.floor / GB:g} GB"
        if low:
            detail = (f"{free / GB:.3g} GB free in {self.out}, below min_free_gb ({floor}): overlays and moving "
                      f"frames paused, rows still recorded")
            log.warning(detail)
        else:
            detail = f"{free / GB:.3g} GB free in {self.out} again: overlays and moving frames resumed"
            log.info(detail)
        try:  # the station shows it as an alarm, the outputs publish it as an event
            self.store.add_events([(time.time(), "disk", "disk space low", "raised" if low else "cleared",
                                    detail, None)])
        except Exception as exc:  # a disk too full even for that: the console said it
            self.warn_once(log, f"disk-event:{type(exc).__name__}", f"disk event not recorded: {describe(exc)}")


class Retention:
    """The retention thread: `start()` with the watcher, `stop()` after its last commit."""

    def __init__(self, store: ResultStore, out: Path, settings: RetentionSettings, marks: list[str],
                 space: Space, warn_once: WarnOnce) -> None:
        self.store, self.out, self.settings, self.marks = store, out, settings, marks
        self.space, self.warn_once = space, warn_once
        self.archived = 0  # rows archived in this run
        self.deleted = 0  # files deleted in this run
        self._files: collections.deque[tuple[str, int]] = collections.deque()  # (path, bytes), oldest first
        self._bytes = 0
        self._new: list[tuple[str, int]] = []  # written before the start-up listing is done
        self._listed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch-retention", daemon=True)

    def start(self) -> Retention:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)

    def wrote(self, path: str | Path) -> None:
        """An overlay or a moved frame now in OUT (the committer's and the disposal's threads)."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        with self._lock:
            if self._listed:
                self._files.append((str(path), size))
                self._bytes += size
            else:
                self._new.append((str(path), size))

    def _run(self) -> None:
        self._list()
        while True:
            self.run_once()
            if self._stop.wait(self.settings.interval_s):
                return

    def run_once(self) -> None:
        for step in (self._rows, self._trim):
            try:
                step()
            except Exception as exc:  # retention must never stop the line; the next pass tries again
                self.warn_once(log, f"retention:{step.__name__}:{type(exc).__name__}",
                               f"retention: {describe(exc)}; trying again every {self.settings.interval_s:g} s")
        self.space.room()

    def _rows(self) -> None:
        before = time.time() - self.settings.days * 86400
        while not self._stop.is_set():
            n = self.store.retire(before, self.marks)
            if n == 0:
                return
            self.archived += n
            time.sleep(_STEP_PAUSE_S)

    def _list(self) -> None:
        """Our files in OUT, oldest first (once, at start)."""
        found = []
        for sub in OUTPUT_SUBDIRS:
            with contextlib.suppress(OSError), os.scandir(self.out / sub) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.is_file(follow_symlinks=False):
                            st = e.stat(follow_symlinks=False)
                            found.append((st.st_mtime_ns, e.path, st.st_size))
        found.sort()
        with self._lock:
            known = {p for _, p, _ in found}
            self._files.extend((p, size) for _, p, size in found)
            self._files.extend(f for f in self._new if f[0] not in known)
            self._bytes = sum(size for _, size in self._files)
            self._new, self._listed = [], True

    def _trim(self) -> None:
        """Delete our oldest files while over the budget or below the floor."""
        budget = None if self.settings.disk_gb is None else int(self.settings.disk_gb * GB)
        while not self._stop.is_set():
            with self._lock:
                over = budget is not None and self._bytes > budget
                short = self.space.free() < self.space.floor + self.space.margin
                if not self._files or not (over or short):
                    return
                path, size = self._files.popleft()
                self._bytes -= size
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                self.deleted += 1
