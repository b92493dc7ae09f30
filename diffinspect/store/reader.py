"""Reading results.db beside a running watcher: the station page, the outputs, the demo and the tests.

A `ResultsReader` opens the database read-only (a `mode=ro` URI): SQLite's WAL lets it read while the
watcher commits, and it never creates the file, writes to it, or takes a write lock, so a reader can
neither slow nor break scoring. results.db has no index on time and a reader may not add one, so the
queries by time work on ranges of row ids (the primary key) found with `first_id_since`: a query costs
the same after a month of frames as after an hour.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

# The tables a reader may follow row by row (the outputs' streams): frames, and the drift alarms.
TABLES = ("frames", "events")


class ResultsReader:
    """Named queries over one results.db (a context manager: closes the connection). A database without
    its tables yet, or one locked for longer than the timeout, raises `store.NotReady`."""

    def __init__(self, db_path: Path, timeout: float = 2.0) -> None:
        self.db_path = Path(db_path)
        self._db = self._connect(timeout)
        self._db.row_factory = sqlite3.Row

    def _connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(f"{self.db_path.absolute().as_uri()}?mode=ro", uri=True, timeout=timeout)

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

    def first_id_since(self, since: float) -> int:
        """The smallest frame id scored at or after `since` (rows are committed in time order, within the
        few milliseconds lanes may interleave), by binary search over the primary key."""
        lo, hi = self._db.execute("SELECT COALESCE(MIN(id), 0), COALESCE(MAX(id), 0) FROM frames").fetchone()
        hi += 1
        while lo < hi:
            mid = (lo + hi) // 2
            row = self._db.execute("SELECT id, scored_at FROM frames WHERE id >= ? ORDER BY id LIMIT 1",
                                   (mid,)).fetchone()
            if row is None or row[1] >= since:
                hi = mid
            else:
                lo = row[0] + 1
        return lo

    def mark(self, key: str) -> int:
        """An output's delivered-up-to mark (store/deliveries.py); 0 before it has one."""
        hit = self._db.execute("SELECT last_id FROM deliveries WHERE output = ?", (key,)).fetchone()
        return int(hit[0]) if hit else 0

    # -- frames --------------------------------------------------------------------------------------

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM frames WHERE id = ?", (frame_id,))

    def status_counts(self, since: float) -> dict[str, int]:
        """Frames scored since `since`: total, ok, ng, error, hold."""
        r = self._one("SELECT COUNT(*) n, SUM(status='ok') ok, SUM(status='ng') ng, SUM(status='error') error, "
                      "SUM(status='hold') hold FROM frames WHERE id >= ? AND scored_at >= ?",
                      (self.first_id_since(since), since))
        return {k: (r or {}).get(k) or 0 for k in ("n", "ok", "ng", "error", "hold")}

    def per_minute(self, since: float) -> list[dict[str, Any]]:
        """(minute b since `since`, status, n) for the frames scored since then."""
        return self._all("SELECT CAST((scored_at - ?) / 60 AS INTEGER) b, status, COUNT(*) n FROM frames "
                         "WHERE id >= ? AND scored_at >= ? GROUP BY b, status",
                         (since, self.first_id_since(since), since))

    def latencies(self, last: int) -> list[float | None]:
        return [r[0] for r in self._db.execute("SELECT latency_ms FROM frames ORDER BY id DESC LIMIT ?", (last,))]

    def last_scored(self, after: int) -> dict[str, Any] | None:
        """The newest frame a detector scored (no error row)."""
        return self._one("SELECT id, detector, backend, fallback_reason, threshold, scored_at FROM frames "
                         "WHERE id > ? AND status != 'error' ORDER BY id DESC LIMIT 1", (after,))

    def fallback_count(self, after: int, last: int) -> tuple[int, int]:
        """Of the newest `last` scored frames: how many, and how many the fallback scored."""
        n, fallback = self._db.execute(
            "SELECT COUNT(*), SUM(fallback_reason IS NOT NULL) FROM (SELECT fallback_reason FROM frames "
            "WHERE id > ? AND status != 'error' ORDER BY id DESC LIMIT ?)", (after, last)).fetchone()
        return n, fallback or 0

    def scores(self, after: int, last: int) -> list[dict[str, Any]]:
        """score, threshold and detector of the newest `last` scored frames, newest first."""
        return self._all("SELECT score, threshold, detector FROM frames WHERE id > ? AND status != 'error' AND "
                         "score IS NOT NULL ORDER BY id DESC LIMIT ?", (after, last))

    def rejects(self, after: int, last: int) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM frames WHERE id > ? AND status = 'ng' ORDER BY id DESC LIMIT ?",
                         (after, last))

    def held(self, after: int) -> list[dict[str, Any]]:
        """The camera folders whose newest row (after id `after`) is held, with why and since when."""
        if "hold_reason" not in self.columns():
            return []
        return self._all("SELECT id, folder, hold_reason, scored_at FROM frames WHERE id IN (SELECT MAX(id) "
                         "FROM frames WHERE id > ? GROUP BY folder) AND status = 'hold' ORDER BY folder", (after,))

    def health(self, after: int, last: int) -> list[dict[str, Any]]:
        """id, scored_at, folder and the health JSON of the newest `last` frames that have it, newest first
        (none from a database written before health was stored)."""
        if "health" not in self.columns():
            return []
        return self._all("SELECT id, scored_at, folder, health FROM frames WHERE id > ? AND health IS NOT NULL "
                         "ORDER BY id DESC LIMIT ?", (after, last))

    # -- events --------------------------------------------------------------------------------------

    def events(self, last: int | None = None) -> list[dict[str, Any]]:
        """The drift events, oldest first; with `last`, the newest `last` of them, newest first (none from a
        database written before events were stored)."""
        if "events" not in self.tables():
            return []
        if last is None:
            return self._all("SELECT * FROM events ORDER BY id")
        return self._all("SELECT * FROM events ORDER BY id DESC LIMIT ?", (last,))


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


def _table(name: str) -> str:
    if name not in TABLES:
        raise ValueError(f"no table {name!r} in results.db")
    return name
