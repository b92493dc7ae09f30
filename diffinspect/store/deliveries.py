"""The outputs' delivery marks: the table `deliveries(output, last_id)` in results.db, one mark per output
and stream, moved only once the receiver acknowledged the row (outputs/outbox.py says why).

The marks are written with synchronous=NORMAL: a kill -9 keeps them (WAL), a power cut may lose the last
moves, which only re-sends rows with the ids they had. The rows themselves are committed by the
ResultStore with synchronous=FULL before an output can see them.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from diffinspect.store.reader import ResultsReader

_TABLE = "CREATE TABLE IF NOT EXISTS deliveries (output TEXT PRIMARY KEY, last_id INTEGER NOT NULL)"


class Deliveries(ResultsReader):
    """A read-write connection for one output's thread: the reader's queries plus the marks. `replaced()`
    says when results.db was deleted or replaced (and written again by the store) under it."""

    def __init__(self, db_path: Path, timeout: float = 30.0) -> None:
        self._ident = _ident(Path(db_path))
        super().__init__(db_path, timeout)
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(self.db_path, timeout=timeout, isolation_level=None)

    def start_marks(self, marks: dict[str, str], replay: bool = False) -> None:
        """Set the marks that do not exist yet ({key: table}): at the newest row of the table (the rows
        committed from now on), at its beginning with `replay` or while the table does not exist yet."""
        self._db.execute(_TABLE)
        tables = self.tables()
        for key, table in marks.items():
            start = 0 if replay or table not in tables else self.max_id(table)
            self._db.execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?)", (key, start))

    def move_mark(self, key: str, last_id: int) -> None:
        self._db.execute("UPDATE deliveries SET last_id = ? WHERE output = ?", (last_id, key))

    def replaced(self) -> bool:
        return _ident(self.db_path) != self._ident


def pending(db_path: Path, key: str, table: str = "frames") -> int:
    """Rows of `table` committed but not yet acknowledged under the mark `key`."""
    with ResultsReader(db_path) as db:
        return db.count(table, after=db.mark(key))


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
