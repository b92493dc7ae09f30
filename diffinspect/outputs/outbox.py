"""The outbox: every committed row of results.db reaches each output (MQTT, OPC UA) in id order.

The results database is the outbox. Each output keeps a delivered-up-to mark per stream in the table
`deliveries(output, last_id)` of the same database; its own thread reads the committed rows after the
mark in id order, hands them to the output one at a time, and moves the mark only once the receiver has
acknowledged (MQTT PUBACK, OPC UA write status Good). So:

- scoring never waits for an output: the watcher commits rows and sets an Event; a slow poll catches
  anything the Event missed (a row committed by another process, the events table of the station view);
- a receiver that is down costs nothing but a growing backlog, kept in SQLite and delivered on
  reconnection, with back-off between attempts (0.5 s doubling to 30 s);
- after a crash (kill -9) the only row sent twice is the one in flight (sent, mark not yet moved); it
  carries the same id, so a receiver can drop it. One row in flight at a time is what makes that bound
  hold; on this machine it costs well under a millisecond per row on the loopback (see
  bench/line_latency.py).

The marks and the queries live in the store (store/deliveries.py), with how durable a mark is.

A new output starts at the rows committed from then on (adding MQTT to a station with a year of results
does not replay the year); streams whose table does not exist yet start at their beginning.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from diffinspect.store import StoreError
from diffinspect.store.deliveries import Deliveries
from diffinspect.store.deliveries import pending as pending_rows

# stream name -> table; the events table (alarms of the station view) is optional.
STREAMS = {"frames": "frames", "events": "events"}
_BATCH = 128  # rows read per query


class OutputError(Exception):
    """A failure an operator can act on (refused credentials, unknown node): said once, in one line."""


class Output(Protocol):
    name: str  # the mark's key in `deliveries`
    streams: tuple[str, ...]  # which of STREAMS it delivers
    acknowledged_rows: int  # frames acknowledged by the receiver since it was made

    def open(self) -> None:
        """Connect; raise (OutputError for the actionable kinds) when the receiver cannot be reached."""

    def send(self, stream: str, row: dict) -> None:
        """Return once the receiver acknowledged the row; raise otherwise (the row is sent again)."""

    def close(self) -> None:
        """Disconnect cleanly (an MQTT output says 'offline' first); never raises."""


def mark_key(output: str, stream: str) -> str:
    return output if stream == "frames" else f"{output}/{stream}"


@dataclass
class OutputState:
    name: str
    connected: bool = False
    delivered: int = 0  # rows acknowledged in this run
    last_id: int = 0  # the frames mark
    error: str | None = None  # the last failure, while it lasts


class Outbox:
    """One thread per output. `wake()` after each commit; `stop()` gives the outputs a short time to
    deliver what is committed, then closes them."""

    def __init__(self, db_path: Path, outputs: Sequence[Output], warn: Callable[[str], None],
                 info: Callable[[str], None] | None = None, poll_s: float = 1.0,
                 backoff_s: tuple[float, float] = (0.5, 30.0), replay: bool = False) -> None:
        self.db_path = Path(db_path)
        self.replay = replay  # a new output starts at the first row instead of the rows from now on
        self.outputs = list(outputs)
        self.warn, self.info = warn, info or warn
        self.poll_s, self.backoff_s = poll_s, backoff_s
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._workers = [_Worker(self, out) for out in self.outputs]

    def start(self) -> Outbox:
        """Set the marks of new outputs here, in the caller's thread: "from now on" means the rows
        committed after start() returns, whenever the threads get going."""
        with Deliveries(self.db_path) as db:
            db.start_marks({mark_key(out.name, s): STREAMS[s] for out in self.outputs for s in out.streams},
                           self.replay)
        for w in self._workers:
            w.thread.start()
        return self

    def wake(self) -> None:
        for w in self._workers:
            w.wake.set()

    def states(self) -> list[OutputState]:
        return [w.state for w in self._workers]

    def stop(self, drain_s: float = 5.0) -> None:
        """Deliver what is committed for up to drain_s (only while the receiver is up), then close."""
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + drain_s + 15.0  # a send in flight may take its own timeout
        for w in self._workers:
            if w.thread.ident is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Outbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Worker:
    def __init__(self, box: Outbox, output: Output) -> None:
        self.box, self.output = box, output
        self.wake = threading.Event()
        self.state = OutputState(output.name)
        self.thread = threading.Thread(target=self._run, name=f"outbox-{output.name}", daemon=True)
        self._said: str | None = None
        self._db: Deliveries | None = None
        self._tables: set[str] = set()

    def _run(self) -> None:
        try:
            self._loop(self._connect())
        except Exception as exc:  # a bug or an unusable database: the line goes on without this output
            self.box.warn(f"{self.output.name}: output stopped ({type(exc).__name__}: {exc})")
        finally:
            with contextlib.suppress(Exception):
                self.output.close()
            self.state.connected = False
            if self._db is not None:
                self._db.close()

    def _connect(self) -> Deliveries:
        db = self._db = Deliveries(self.box.db_path)
        self._refresh_tables(db)
        self.state.last_id = self._mark(db, "frames")
        return db

    def _loop(self, db: Deliveries) -> None:
        box = self.box
        backoff = box.backoff_s[0]
        next_tables = 0.0
        while True:
            stopping = box._stop.is_set()
            if stopping and time.monotonic() >= box._drain_until:
                return
            if not self.state.connected:
                try:
                    self.output.open()
                except Exception as exc:
                    if stopping:
                        return  # no receiver to drain to
                    self._failed(exc)
                    box._stop.wait(backoff)
                    backoff = min(backoff * 2, box.backoff_s[1])
                    continue
                self.state.connected = True
            self.wake.clear()  # before reading: a commit after this point wakes the next round
            try:
                if db.replaced():
                    # results.db deleted or replaced, and written again by the store: follow it (the
                    # marks came along in the copy) instead of reading a file that no longer gets rows.
                    db.close()
                    db = self._connect()
                if time.monotonic() >= next_tables:
                    self._refresh_tables(db)
                    next_tables = time.monotonic() + box.poll_s
                waiting = self._backlog(db) if self.state.error is not None else 0
            except StoreError as exc:  # locked for long, or an I/O error: try again later
                self._failed(exc)
                box._stop.wait(backoff)
                backoff = min(backoff * 2, box.backoff_s[1])
                continue
            try:
                sent = sum(self._deliver(db, s) for s in self.output.streams)
            except Exception as exc:
                if not isinstance(exc, StoreError):
                    with contextlib.suppress(Exception):
                        self.output.close()
                    self.state.connected = False
                self._failed(exc)
                if stopping:
                    return
                box._stop.wait(backoff)
                backoff = min(backoff * 2, box.backoff_s[1])
                continue
            backoff = box.backoff_s[0]
            if self.state.error is not None:  # said only once rows flow again, not on every reconnect
                self.box.info(f"{self.output.name}: delivering again ({waiting} row(s) were waiting)")
                self.state.error, self._said = None, None
            if sent == 0:
                if stopping:
                    return  # drained
                self.wake.wait(box.poll_s)

    def _deliver(self, db: Deliveries, stream: str) -> int:
        table = STREAMS[stream]
        if table not in self._tables:
            return 0
        key = mark_key(self.output.name, stream)
        rows = db.rows(table, after=self._mark(db, stream), limit=_BATCH)
        for row in rows:
            if self.box._stop.is_set() and time.monotonic() >= self.box._drain_until:
                break
            self.output.send(stream, row)  # returns once acknowledged
            db.move_mark(key, row["id"])
            if stream == "frames":
                self.state.last_id = row["id"]
                self.state.delivered += 1
        return len(rows)

    def _failed(self, exc: Exception) -> None:
        msg = str(exc) if isinstance(exc, OutputError) else f"{type(exc).__name__}: {exc}"
        self.state.error = msg
        if msg != self._said:  # one line per distinct failure, not one per retry
            self._said = msg
            self.box.warn(f"{self.output.name}: {msg}; scoring goes on, results wait in results.db")

    def _refresh_tables(self, db: Deliveries) -> None:
        self._tables = db.tables()

    def _mark(self, db: Deliveries, stream: str) -> int:
        return db.mark(mark_key(self.output.name, stream))

    def _backlog(self, db: Deliveries) -> int:
        return db.count("frames", after=self._mark(db, "frames"))


def pending(db_path: Path, output: str, stream: str = "frames") -> int:
    """Rows committed but not yet acknowledged by `output` (for reports and tests)."""
    return pending_rows(db_path, mark_key(output, stream), STREAMS[stream])
