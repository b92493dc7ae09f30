"""Frame intake for `inspect watch`: which files are frames and when a file is complete; complete
frames are queued, oldest first, to the lanes that read, score and commit them.

A file is only handed on once it is complete:
- a close-after-write (inotify IN_CLOSE_WRITE) or a rename into the folder vouches for it at once;
- otherwise its size and mtime must stay unchanged for `stable_ms` (by our own clock: the mtime of
  a network share follows the server's clock, so "mtime older than X" proves nothing);
- a zero-byte file must stay empty for `empty_ms` before it gets an error row;
- PNG/JPEG/BMP bytes that end before the format's end marker are handed back by the lane and re-read
  once the file has been unchanged for `settle_ms` (a writer that reopens per chunk, or stalls, fools
  the two checks above).
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffinspect.line.frame import Candidate
from diffinspect.line.listing import Folders
from diffinspect.store.results import ResultStore

log = logging.getLogger(__name__)

# (path, size, mtime_ns, status) of a frame committed by an earlier run -> True if the file remains
DisposeCommitted = Callable[[Path, int, int, str], bool]


@dataclass
class IntakeConfig:
    pattern: str | None
    recursive: bool
    stable_ms: float
    empty_ms: float
    settle_ms: float
    rescan_seconds: float
    once: bool


@dataclass
class _Entry:
    folder: Path
    size: int
    mtime_ns: int
    since: float  # monotonic time of the last change we observed
    received_at: float
    state: str = "pending"  # pending | ready | queued | done
    seq: int = 0  # invalidates stale heap entries
    dirty: bool = False  # an event arrived while the frame was in the pipeline
    settling: bool = False  # handed back by the reader: incomplete tail, wait settle_ms
    settled: bool = False


@dataclass(order=True)
class _Due:
    when: float
    seq: int
    path: str = field(compare=False)


class Intake:
    """Finds complete frames in the watched folders and feeds them, oldest first, to the lanes.

    Everything that changes state runs on one thread (`run`); watchdog handlers and the pipeline talk
    to it through `inbox`, so no locks are needed and no event is lost."""

    def __init__(self, folders: list[Path], out: Path, config: IntakeConfig, store: ResultStore,
                 queues: dict[Path, queue.Queue],
                 dispose_committed: DisposeCommitted) -> None:
        self.folders = folders
        self.cfg = config
        self.store = store
        self.queues = queues
        self._dispose_committed = dispose_committed
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = threading.Event()  # once-mode: every backlog frame has its row
        self._halt = threading.Event()
        self._entries: dict[str, _Entry] = {}
        self._due: list[_Due] = []
        self._ready: dict[Path, list[tuple[int, str, int]]] = {f: [] for f in folders}
        self._seq = 0
        self._outstanding = 0  # entries not yet done (once-mode exit condition)
        self._rescan_at = 0.0
        self.files = Folders(folders, out, config.pattern, config.recursive)

    # -- called from other threads ------------------------------------------------------------

    def notify(self, path: str, vouched: bool) -> None:
        """A watchdog event; vouched = close-after-write or renamed into the folder."""
        self.inbox.put(("event", path, vouched))

    def rescan_soon(self) -> None:
        self.inbox.put(("rescan",))

    def done(self, cand: Candidate, remains: bool) -> None:
        """The frame's row is committed (remains: the file is still in the folder)."""
        self.inbox.put(("done", cand, remains))

    def recheck(self, cand: Candidate, settle: bool) -> None:
        """The reader found the file changed (or its tail incomplete, settle=True)."""
        self.inbox.put(("recheck", cand, settle))

    def halt(self) -> None:
        self._halt.set()
        self.inbox.put(("halt",))

    def waiting(self) -> int:
        """Complete frames waiting for room in the scoring queues (for the live view)."""
        return sum(len(h) for h in self._ready.values())

    # -- the intake thread ---------------------------------------------------------------------

    def scan(self) -> None:
        """List the folders: new files become candidates, vanished ones are forgotten."""
        now, wall = time.monotonic(), time.time()
        present: set[str] = set()
        for root in self.folders:
            for path in self.files.files_in(root):
                present.add(path)
                entry = self._entries.get(path)
                if entry is None or entry.state == "done":
                    self._discover(path, root, now, wall, vouched=False)
        for path, entry in list(self._entries.items()):
            if path not in present and entry.state in ("done", "pending"):
                self._forget(path)
        self._rescan_at = now + self.cfg.rescan_seconds

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self._step()
            except Exception as exc:  # e.g. the database briefly unreadable: the rescan recovers
                log.warning(f"intake: {type(exc).__name__}: {exc}")
                time.sleep(0.1)

    def _step(self) -> None:
        try:
            self._handle(self.inbox.get(timeout=self._wait_s()))
            for _ in range(10_000):  # drain what piled up, but keep feeding the lanes
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        if not self.cfg.once and now >= self._rescan_at:
            self.scan()
        self._check_due(now)
        self._feed()
        if self.cfg.once and self._outstanding == 0:
            self.finished.set()

    def _wait_s(self) -> float:
        now = time.monotonic()
        wake = self._rescan_at if not self.cfg.once else now + 1.0
        if self._due:
            wake = min(wake, self._due[0].when)
        if self.waiting():
            wake = min(wake, now + 0.005)  # a lane queue is full: poll for room
        return min(max(wake - now, 0.0), 0.5)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "event":
            self._on_event(msg[1], msg[2])
        elif kind == "done":
            self._on_done(msg[1], msg[2])
        elif kind == "recheck":
            self._on_recheck(msg[1], msg[2])
        elif kind == "rescan":
            self._rescan_at = min(self._rescan_at, time.monotonic() + 0.2)

    def _on_event(self, path: str, vouched: bool) -> None:
        root = self.files.root_of(path)
        if root is None:
            return
        now = time.monotonic()
        entry = self._entries.get(path)
        if entry is None or entry.state == "done":
            self._discover(path, root, now, time.time(), vouched)
        elif entry.state == "queued":
            entry.dirty = True
        elif vouched:
            self._stat_and_advance(path, entry, now, vouched=True)
        else:  # still being written: restart the stability clock without a syscall
            entry.since, entry.settling, entry.settled = now, False, False
            entry.state = "pending"
            self._schedule(path, entry, now + self.cfg.stable_ms / 1000)

    def _on_done(self, cand: Candidate, remains: bool) -> None:
        path = str(cand.path)
        entry = self._entries.get(path)
        if entry is None or entry.state != "queued":
            return
        self._outstanding_change(-1)
        if remains:
            entry.state, entry.size, entry.mtime_ns = "done", cand.size, cand.mtime_ns
        else:
            del self._entries[path]
        if entry.dirty:  # written to while in the pipeline: maybe a new frame under that name
            entry.dirty = False
            self._discover(path, entry.folder, time.monotonic(), time.time(), vouched=False)

    def _on_recheck(self, cand: Candidate, settle: bool) -> None:
        entry = self._entries.get(str(cand.path))
        if entry is None or entry.state != "queued":
            return
        now = time.monotonic()
        entry.state, entry.dirty, entry.settled = "pending", False, False
        entry.settling = settle
        entry.since = now
        wait = self.cfg.settle_ms if settle else self.cfg.stable_ms
        self._schedule(str(cand.path), entry, now + wait / 1000)

    def _discover(self, path: str, root: Path, now: float, wall: float, vouched: bool) -> None:
        """A path not (or no longer) known as a pending frame."""
        st = self.files.stat(path)
        old = self._entries.get(path)
        if st is None:
            if old is not None:
                self._forget(path)
            return
        size, mtime_ns = st
        if old is not None and (old.size, old.mtime_ns) == (size, mtime_ns):
            return  # the frame we already committed
        if old is not None:
            del self._entries[path]
        status = self.store.status_of(path, size, mtime_ns)
        if status is not None:  # committed before (earlier run): finish what the crash interrupted
            self._entries[path] = _Entry(root, size, mtime_ns, now, wall, state="done")
            if not self._dispose_committed(Path(path), size, mtime_ns, status):
                self._entries.pop(path, None)
            return
        entry = _Entry(root, size, mtime_ns, now, wall)
        self._entries[path] = entry
        self._outstanding_change(+1)
        if vouched and size > 0:
            self._make_ready(path, entry)
        else:
            self._schedule(path, entry, now + self.cfg.stable_ms / 1000)

    def _check_due(self, now: float) -> None:
        while self._due and self._due[0].when <= now:
            item = heapq.heappop(self._due)
            entry = self._entries.get(item.path)
            if entry is None or entry.seq != item.seq or entry.state != "pending":
                continue
            self._stat_and_advance(item.path, entry, now, vouched=False)

    def _stat_and_advance(self, path: str, entry: _Entry, now: float, vouched: bool) -> None:
        st = self.files.stat(path)
        if st is None:
            self._forget(path)
            return
        if st != (entry.size, entry.mtime_ns):
            entry.size, entry.mtime_ns = st
            entry.since, entry.settling, entry.settled = now, False, False
            if not (vouched and entry.size > 0):
                self._schedule(path, entry, now + self.cfg.stable_ms / 1000)
                return
        quiet_s = now - entry.since
        if entry.settling:
            if quiet_s >= self.cfg.settle_ms / 1000:
                entry.settling, entry.settled = False, True
                self._make_ready(path, entry)
            else:
                self._schedule(path, entry, entry.since + self.cfg.settle_ms / 1000)
        elif entry.size == 0:
            if quiet_s >= self.cfg.empty_ms / 1000:
                self._make_ready(path, entry)  # the reader turns it into "empty file (0 bytes)"
            else:
                self._schedule(path, entry, entry.since + self.cfg.empty_ms / 1000)
        elif vouched or quiet_s >= self.cfg.stable_ms / 1000:
            self._make_ready(path, entry)
        else:
            self._schedule(path, entry, entry.since + self.cfg.stable_ms / 1000)

    def _schedule(self, path: str, entry: _Entry, when: float) -> None:
        self._seq += 1
        entry.seq = self._seq
        heapq.heappush(self._due, _Due(when, self._seq, path))

    def _make_ready(self, path: str, entry: _Entry) -> None:
        self._seq += 1
        entry.seq, entry.state = self._seq, "ready"
        heapq.heappush(self._ready[entry.folder], (entry.mtime_ns, path, self._seq))

    def _feed(self) -> None:
        """Oldest complete frames first, while the lane's bounded queue has room; folders that share
        a lane take turns, so one busy camera cannot starve another."""
        active = [root for root, heap in self._ready.items() if heap]
        while active:
            active = [root for root in active if self._feed_one(root)]

    def _feed_one(self, root: Path) -> bool:
        heap = self._ready[root]
        while heap:
            _, path, seq = heap[0]
            entry = self._entries.get(path)
            if entry is None or entry.seq != seq or entry.state != "ready":
                heapq.heappop(heap)
                continue
            cand = Candidate(Path(path), root, entry.size, entry.mtime_ns, entry.received_at,
                             settled=entry.settled)
            try:
                self.queues[root].put_nowait(cand)
            except queue.Full:
                return False
            heapq.heappop(heap)
            entry.state = "queued"
            return True
        return False

    def _forget(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None and entry.state in ("pending", "ready"):
            self._outstanding_change(-1)

    def _outstanding_change(self, delta: int) -> None:
        self._outstanding += delta
