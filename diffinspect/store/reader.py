"""Reading results.db beside a running watcher: the station page, the outputs, the demo and the tests.

A `ResultsReader` opens the database read-only: it never creates a file in OUT, writes, or takes a write
lock, so a reader can neither slow nor break scoring. SQLite's read-only rules for a WAL database decide
how: while results.db-wal exists (a watcher has it open, or died with it) the reader shares the watcher's
log (`mode=ro`); without one, `mode=ro` would create -wal and -shm beside results.db, so the reader opens
the file as it lies (`immutable=1`) and `unchanged()` says afterwards whether a writer touched it meanwhile.

Every query a poll makes is a bounded range: counts by time come from the seconds table the committer
keeps (store/results.py), plus the rows of the seconds a window's edge cuts; the rest reads the newest
rows by primary key. A query costs the same after a year of frames as after an hour.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "ng", "error", "hold")
# floor(scored_at) in SQL (CAST truncates toward zero): the key of the seconds table (store/results.py)
SECOND_SQL = "(CAST(scored_at AS INTEGER) - (scored_at < CAST(scored_at AS INTEGER)))"

# The tables a reader may follow row by row (the outputs' streams): frames, and the drift alarms.
TABLES = ("frames", "events")


class ResultsReader:
    """Named queries over one results.db (a context manager: closes the connection). A database without
    its tables yet, or one locked for longer than the timeout, raises `store.NotReady`."""

    def __init__(self, db_path: Path, timeout: float = 2.0) -> None:
        self.db_path = Path(db_path)
        self._snapshot: tuple | None = None
        self._db = self._connect(timeout)
        self._db.row_factory = sqlite3.Row

    def _connect(self, timeout: float) -> sqlite3.Connection:
        uri = f"{self.db_path.absolute().as_uri()}?mode=ro"
        if not _wal(self.db_path).exists():
            self._snapshot = _stat(self.db_path)
            uri += "&immutable=1"
        return sqlite3.connect(uri, uri=True, timeout=timeout)

    def unchanged(self) -> bool:
        """False when a writer may have changed the file under a reader that opened it as it lay (no -wal):
        what it read may be torn, so read again (the writer's log exists by then)."""
        return self._snapshot is None or (not _wal(self.db_path).exists() and _stat(self.db_path) == self._snapshot)

    @classmethod
    def open(cls, db_path: Path) -> ResultsReader | None:
        """A reader, or None while there is no results.db yet."""
        return cls(db_path) if Path(db_path).is_file() else None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute(sql, args)]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        row = self._db.execute(sql, args).fetchone()
        return None if row is None else dict(row)

    # -- tables and ids ----------------------------------------------------------------------------

    def tables(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def columns(self, table: str = "frames") -> set[str]:
        return {r[1] for r in self._db.execute(f"PRAGMA table_info({_table(table)})")}

    def max_id(self, table: str = "frames") -> int:
        return int(self._db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {_table(table)}").fetchone()[0])

    def count(self, table: str = "frames", after: int = 0) -> int:
        return int(self._db.execute(f"SELECT COUNT(*) FROM {_table(table)} WHERE id > ?", (after,)).fetchone()[0])

    def rows(self, table: str = "frames", after: int = 0, limit: int = -1) -> list[dict[str, Any]]:
        """Whole rows after id `after`, in id order (what the outputs deliver)."""
        return self._all(f"SELECT * FROM {_table(table)} WHERE id > ? ORDER BY id LIMIT ?", (after, limit))

    def mark(self, key: str) -> int:
        """An output's delivered-up-to mark (store/deliveries.py); 0 before it has one."""
        hit = self._db.execute("SELECT last_id FROM deliveries WHERE output = ?", (key,)).fetchone()
        return int(hit[0]) if hit else 0

    # -- frames --------------------------------------------------------------------------------------

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM frames WHERE id = ?", (frame_id,))

    def status_counts(self, since: float, until: int | None = None) -> dict[str, int]:
        """Frames scored at or after `since` (and before the second `until`), by status: whole seconds from the
        seconds table, the second that `since` cuts row by row."""
        first = math.ceil(since)
        r = self._db.execute(f"SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(ng), 0), COALESCE(SUM(error), 0), "
                             f"COALESCE(SUM(hold), 0) FROM {self._seconds()} WHERE second >= ? AND second < ?",
                             (first, 2**62 if until is None else until)).fetchone()
        counts = dict(zip(STATUSES, r, strict=True))
        if first != since:
            for t, status in self._second_rows(math.floor(since)):
                counts[status] += t >= since
        return counts

    def per_window(self, since: float, width: float, n: int) -> list[dict[str, int]]:
        """Frames by status scored in each of the n windows [since + width * i, since + width * (i + 1))."""
        edges = [since + width * i for i in range(n + 1)]
        cut = sorted({math.floor(e) for e in edges if e != math.floor(e)})  # seconds an edge falls inside
        marks = ", ".join("?" * len(cut))
        window = "CAST((t - ?) / ? AS INTEGER)"
        whole = (f"SELECT {window} b, SUM(ok), SUM(ng), SUM(error), SUM(hold) FROM "
                 f"(SELECT second t, ok, ng, error, hold FROM "
                 f"{self._seconds()} WHERE second >= ? AND second < ? AND second NOT IN ({marks})) GROUP BY b")
        split = (f"SELECT {window} b, SUM(status = 'ok'), SUM(status = 'ng'), SUM(status = 'error'), "
                 f"SUM(status = 'hold') FROM "
                 f"(SELECT f.scored_at t, f.status FROM {self._seconds()} s JOIN frames f "
                 f"ON f.id BETWEEN s.first_id AND s.last_id WHERE s.second IN ({marks}) "
                 f"AND f.scored_at >= max(s.second, ?) AND f.scored_at < min(s.second + 1, ?)) GROUP BY b")
        out = [dict.fromkeys(STATUSES, 0) for _ in range(n)]
        for sql, args in ((whole, (since, width, math.ceil(since), edges[-1], *cut)),
                          (split, (since, width, *cut, since, edges[-1]))):
            for b, *counts in self._db.execute(sql, args):
                if 0 <= b < n:
                    for status, k in zip(STATUSES, counts, strict=True):
                        out[b][status] += k
        return out

    def second_counts(self, first: int, last: int | None = None) -> list[tuple[int, int, int, int, int]]:
        """(second, ok, ng, error, hold) of the seconds [first, last) that have frames (without last: from
        first on, a clock a little ahead included)."""
        return self._db.execute(f"SELECT second, ok, ng, error, hold FROM {self._seconds()} WHERE second >= ? "
                                f"AND second < ? ORDER BY second", (first, 2**62 if last is None else last)).fetchall()

    def _second_rows(self, second: int) -> list[tuple[float, str]]:
        """(scored_at, status) of the frames of one second, read between its first and last id."""
        return self._db.execute(f"SELECT f.scored_at, f.status FROM {self._seconds()} s JOIN frames f ON f.id "
                                f"BETWEEN s.first_id AND s.last_id WHERE s.second = ? AND f.scored_at >= s.second "
                                f"AND f.scored_at < s.second + 1", (second,)).fetchall()

    def _seconds(self) -> str:
        """The seconds table; a database no watcher of this version has opened yet has none and no reader
        may add one, so it gets a temporary view over the whole table instead (slow, but right)."""
        if "seconds" not in self.tables():
            self._db.execute(f"CREATE TEMP VIEW IF NOT EXISTS seconds AS SELECT {SECOND_SQL} second, "
                             f"SUM(status = 'ok') ok, SUM(status = 'ng') ng, SUM(status = 'error') error, "
                             f"MIN(id) first_id, MAX(id) last_id, SUM(status = 'hold') hold FROM frames GROUP BY 1")
        return "seconds"

    def latencies(self, last: int) -> list[float | None]:
        return [r[0] for r in self._db.execute("SELECT latency_ms FROM frames ORDER BY id DESC LIMIT ?", (last,))]

    def last_scored(self, after: int) -> dict[str, Any] | None:
        """The newest frame a detector scored (no error row, nor one held unscored: an unknown product)."""
        cols = self.columns()
        extra = "".join(f", {c}" for c in ("product", "bundle_version") if c in cols)
        return self._one(f"SELECT id, folder, detector, backend, fallback_reason, threshold, scored_at{extra} "
                         "FROM frames WHERE id > ? AND status != 'error' AND score IS NOT NULL "
                         "ORDER BY id DESC LIMIT 1", (after,))

    def fallback_count(self, after: int, last: int) -> tuple[int, int]:
        """Of the newest `last` scored frames: how many, and how many the fallback scored."""
        n, fallback = self._db.execute(
            "SELECT COUNT(*), SUM(fallback_reason IS NOT NULL) FROM (SELECT fallback_reason FROM frames "
            "WHERE id > ? AND status != 'error' ORDER BY id DESC LIMIT ?)", (after, last)).fetchone()
        return n, fallback or 0

    def scores(self, after: int, last: int, product: str | None = None) -> list[tuple[float, float | None, str | None]]:
        """(score, threshold, detector) of the newest `last` scored frames (of one product), newest first."""
        of = " AND product = ?" if product is not None else ""
        return self._db.execute(f"SELECT score, threshold, detector FROM frames WHERE id > ? AND status != 'error' "
                                f"AND score IS NOT NULL{of} ORDER BY id DESC LIMIT ?",
                                (after, *([product] if of else []), last)).fetchall()

    def product_counts(self, after: int, last: int) -> dict[str, dict[str, int]]:
        """The newest `last` rows after id `after` by product and status (none from a database without
        products)."""
        if "product" not in self.columns():
            return {}
        out: dict[str, dict[str, int]] = {}
        for product, status, n in self._db.execute(
                "SELECT product, status, COUNT(*) FROM (SELECT product, status FROM frames WHERE id > ? "
                "ORDER BY id DESC LIMIT ?) WHERE product IS NOT NULL GROUP BY product, status", (after, last)):
            out.setdefault(product, dict.fromkeys(STATUSES, 0))[status] = n
        return out

    def rejects(self, after: int, last: int) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM frames WHERE id > ? AND status = 'ng' ORDER BY id DESC LIMIT ?",
                         (after, last))

    def last_frames(self, last: int) -> list[dict[str, Any]]:
        """id, path, status, score and scored_at of the newest `last` frames, newest first."""
        return self._all("SELECT id, path, status, score, threshold, scored_at FROM frames ORDER BY id DESC LIMIT ?",
                         (last,))

    def held(self, after: int) -> list[dict[str, Any]]:
        """The camera folders whose newest row is held, with why and since when: one row per camera from the
        cameras table the committer keeps; a database no watcher of this version opened yet has none, and its
        newest rows after id `after` stand in."""
        if "hold_reason" not in self.columns():
            return []
        newest = ("SELECT last_id FROM cameras" if "cameras" in self.tables() else
                  "SELECT MAX(id) FROM frames WHERE id > ? GROUP BY folder")
        return self._all(f"SELECT id, folder, hold_reason, scored_at FROM frames WHERE id IN ({newest}) "
                         f"AND status = 'hold' ORDER BY folder", () if "cameras" in self.tables() else (after,))

    def health(self, after: int, last: int, product: str | None = None) -> list[dict[str, Any]]:
        """id, scored_at, folder and the health JSON of the frames that have it among the newest `last` after
        id `after` (of one product), newest first (error rows and a database written before health was stored
        have none)."""
        if "health" not in self.columns():
            return []
        of = " AND product = ?" if product is not None else ""
        return self._all("SELECT id, scored_at, folder, health FROM (SELECT id, scored_at, folder, health"
                         f"{', product' if of else ''} FROM frames WHERE id > ? ORDER BY id DESC LIMIT ?) "
                         f"WHERE health IS NOT NULL{of}", (after, last, *([product] if of else [])))

    # -- events --------------------------------------------------------------------------------------

    def events(self, last: int = 100) -> list[dict[str, Any]]:
        """The newest `last` drift and disk events, oldest first (none from a database written before events
        were stored)."""
        if "events" not in self.tables():
            return []
        return self._all("SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT ?) ORDER BY id", (last,))

    def alarms(self) -> list[dict[str, Any]]:
        """The alarms open now: the events whose kind and camera have no newer event, when that says raised.
        One row per kind and camera from the alarms table the store keeps; a database no watcher of this
        version opened yet has none, and gets the same answer from every event (slow, but right)."""
        if "events" not in self.tables():
            return []
        newest = ("SELECT event_id FROM alarms" if "alarms" in self.tables() else
                  "SELECT MAX(id) FROM events GROUP BY kind, folder")
        return self._all(f"SELECT * FROM events WHERE id IN ({newest}) AND state = 'raised' ORDER BY id")


    # -- reviews -------------------------------------------------------------------------------------

    def reviews(self, latest: bool = False) -> list[dict[str, Any]]:
        """The operator's reviews (store/reviews.py), oldest first; with `latest`, each frame's latest only
        (none before the first review)."""
        if "reviews" not in self.tables():
            return []
        where = " WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY frame_id)" if latest else ""
        return self._all(f"SELECT * FROM reviews{where} ORDER BY id")

    def review_tally(self, last: int) -> Tally:
        """What the station shows of the reviews, from the summaries each review keeps (store/reviews.py): a few
        rows and an index or two, however many reviews. A database whose reviews no writer of this version
        summarised yet gets the same from every review (slow, but right)."""
        tables = self.tables()
        if "reviews" not in tables:
            return Tally()
        if "review_counts" not in tables:
            return Tally.of(self.reviews(latest=True), last)
        newest = ("SELECT r.* FROM latest_reviews l JOIN reviews r ON r.id = l.review_id{} "
                  "ORDER BY l.review_id DESC LIMIT ?")
        counts = self._db.execute("SELECT status, verdict, frames FROM review_counts WHERE frames > 0")
        return Tally(
            {(s, v): n for s, v, n in counts},
            self._db.execute("SELECT MIN(scored_at) FROM reviews").fetchone()[0],
            self._all(newest.format(""), (last,)),
            self._all(newest.format(" WHERE l.status = 'ok' AND l.verdict = 'defect'"), (last,)))

    def review_of(self, frame_id: int) -> dict[str, Any] | None:
        """The latest review of one frame, or None."""
        if "reviews" not in self.tables():
            return None
        return self._one("SELECT * FROM reviews WHERE frame_id = ? ORDER BY id DESC LIMIT 1", (frame_id,))


@dataclass
class Tally:
    """The reviews by each reviewed frame's latest review: frames by (status, verdict), the scored_at of the
    earliest reviewed frame, and the newest `last` of those reviews and of the misses among them (OK frames
    found defective), newest first."""

    frames: dict[tuple[str, str], int] = field(default_factory=dict)
    since: float | None = None
    last: list[dict[str, Any]] = field(default_factory=list)
    last_misses: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, latest: list[dict[str, Any]], last: int) -> Tally:
        """From each frame's latest review, oldest first."""
        misses = [r for r in latest if (r["status"], r["verdict"]) == ("ok", "defect")]
        return cls(dict(Counter((r["status"], r["verdict"]) for r in latest)),
                   min((r["scored_at"] for r in latest), default=None), latest[::-1][:last], misses[::-1][:last])


def count_frames(db_path: Path) -> int:
    """Frames in results.db so far, read while a watcher writes (0 before its database is readable)."""
    try:
        reader = ResultsReader.open(db_path)
        if reader is None:
            return 0
        with reader:
            return reader.count()
    except sqlite3.Error:
        return 0


def explain(exc: sqlite3.Error, db_path: Path) -> str | None:
    """One line saying why results.db cannot be read, or None when it is only busy for a moment."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return None
    if "not a database" in text:
        return f"{db_path} is not a SQLite database: not the results of `inspect watch`"
    if "malformed" in text:
        return f"{db_path} is damaged ({text}): a truncated or overwritten copy?"
    if "no such table" in text:
        return f"{db_path} has no frames table: not the results of `inspect watch`"
    if "unable to open" in text and _wal(db_path).exists():
        return (f"cannot read {db_path} read-only: its write-ahead log (results.db-wal) needs a results.db-shm "
                f"this station may not create; it reads again once `inspect watch` runs on {db_path.parent}")
    return f"cannot read {db_path}: {text}"


def _wal(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-wal")


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _table(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"no table {name!r} in results.db")
    return name
