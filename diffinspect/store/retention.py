"""Rows leaving results.db: archived first, one gzip file of JSON lines per day, then deleted.

OUT/archive/YYYY-MM-DD.jsonl.gz (the local day the row was scored) reads with `zcat`, `gzip -dc` or any
gzip library: each step appends one gzip member, and concatenated members are one valid gzip stream.

Crash safety without a second copy: the table `archive(day, size)` in results.db records how many bytes
of each day's file are durable and accounted for. A step cuts the file back to that size (dropping a
member a crash left behind, whose rows are still in the table), appends one member, fsyncs it, and only
then, in one transaction, deletes its rows and records the new size. A crash before that transaction
leaves the rows in the table and the member cut off next time; after it, the rows are in the file only.
So a row is never lost and never archived twice.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sqlite3
import time
from pathlib import Path

_TABLE = "CREATE TABLE IF NOT EXISTS archive (day TEXT PRIMARY KEY, size INTEGER NOT NULL)"


def day_of(t: float) -> str:
    """The local calendar day of unix time t, as the archive and the mirror name it."""
    return time.strftime("%Y-%m-%d", time.localtime(t))


def acknowledged_upto(db: sqlite3.Connection, marks: list[str]) -> int:
    """The newest frame id every one of these outputs acknowledged (all rows without outputs)."""
    if not marks:
        return 2**63 - 1
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='deliveries'").fetchone():
        return 0
    found = dict(db.execute(f"SELECT output, last_id FROM deliveries WHERE output IN "
                            f"({', '.join('?' for _ in marks)})", marks).fetchall())
    return min(found.get(m, 0) for m in marks)


def archive_step(db: sqlite3.Connection, archive_dir: Path, before: float, upto_id: int, limit: int) -> int:
    """Archive and delete the oldest rows scored before `before` with id <= upto_id, at most `limit`,
    all of one day; returns how many left results.db (0: nothing to do). The caller holds the store's lock."""
    db.execute(_TABLE)
    # By id, not by time: the oldest ids are the oldest rows, so this reads a few pages, never the table.
    # Read whole (fetchall): a statement left open would hold its snapshot into the write below, which
    # SQLite refuses at once (SQLITE_BUSY) after any other connection wrote.
    cur = db.execute("SELECT * FROM frames WHERE id <= ? ORDER BY id LIMIT ?", (upto_id, limit))
    names = [d[0] for d in cur.description]
    rows = []
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        if row["scored_at"] >= before or (rows and day_of(row["scored_at"]) != day_of(rows[0]["scored_at"])):
            break
        rows.append(row)
    if not rows:
        return 0
    day = day_of(rows[0]["scored_at"])
    path = archive_dir / f"{day}.jsonl.gz"
    hit = db.execute("SELECT size FROM archive WHERE day = ?", (day,)).fetchone()
    size = _append(path, hit[0] if hit else 0, "".join(json.dumps(r) + "\n" for r in rows).encode())
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DELETE FROM frames WHERE id >= ? AND id <= ?", (rows[0]["id"], rows[-1]["id"]))
        # Every id up to the last archived one has left: the seconds made only of such frames go too. Those
        # all lie before `before` (so do their frames): a range of the key, not a read of every second.
        db.execute("DELETE FROM seconds WHERE second < ? AND last_id <= ?", (before, rows[-1]["id"]))
        db.execute("INSERT OR REPLACE INTO archive (day, size) VALUES (?, ?)", (day, size))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return len(rows)


def _append(path: Path, durable: int, data: bytes) -> int:
    """Append one gzip member after the first `durable` bytes, durably; returns the new size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        # Shorter than recorded: the file was cut or replaced by hand; go on after what is there.
        start = min(durable, os.fstat(fd).st_size)
        os.ftruncate(fd, start)
        os.lseek(fd, start, os.SEEK_SET)
        member = gzip.compress(data, mtime=0)
        view = memoryview(member)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)
    return start + len(member)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
