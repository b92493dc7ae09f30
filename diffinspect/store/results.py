"""The results store of `inspect watch`: SQLite is the truth, `results.jsonl` is its mirror.

One row per frame (a `scoring.record.Record`, the record `inspect score` prints too), a frame being
(absolute path, size, mtime_ns): see line/frame.py for why not the path alone. `INSERT OR IGNORE` on
that UNIQUE key, one transaction per batch, makes a frame's row commit exactly once however often the
frame is scored (crash + restart, a rescan racing an event).

Durability: WAL with synchronous=FULL. With NORMAL, a power cut can roll back the last committed
transactions; the watcher moves or deletes a frame right after its commit, so a rolled-back row would
be a frame lost with no result. FULL costs one fsync per batch (a few ms here, off the scoring path).

The JSON lines are appended only after the commit, in row-id order, so the file is always a prefix of
the table; on start-up a torn last line is cut off and the rows the crash kept from it are appended.

The mirror rotates daily: at the first commit of a new local day results.jsonl becomes
results-YYYY-MM-DD.jsonl (the day it was last written) and a new results.jsonl starts. Rows leave the
table only for OUT/archive/ (store/retention.py); a rotated mirror goes once every row it holds did.

Both files are checked before each batch: one deleted or replaced under a running watcher is written
again from the open database (which still holds every row), so a restart never scores the line again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from diffinspect import DiffinspectError
from diffinspect.logs import storable
from diffinspect.scoring.record import Record
from diffinspect.store.reader import SECOND_SQL
from diffinspect.store.retention import acknowledged_upto, archive_step, day_of
from diffinspect.store.reviews import migrate as migrate_reviews

_FRAMES = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,           -- absolute path where the frame was found
    folder TEXT NOT NULL,         -- the watched folder (camera) it came from
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,          -- unix seconds
    mtime_ns INTEGER NOT NULL,    -- exact, part of the frame's identity
    status TEXT NOT NULL CHECK (status IN ('ok', 'ng', 'error', 'hold')),  -- hold: see hold_reason
    score REAL,
    threshold REAL,
    detector TEXT,                -- diffusion | copod (NULL for error rows)
    backend TEXT,
    latency_ms REAL,              -- from first seen to the row being written
    overlay TEXT,
    error TEXT,
    fallback_reason TEXT,         -- why the fallback scored it (NULL when diffusion did)
    received_at REAL NOT NULL,    -- unix seconds, when the watcher first saw the file
    scored_at REAL NOT NULL,      -- unix seconds, when the row was written
    health TEXT,                  -- JSON: brightness, contrast, sharpness, shift (scoring/health.py)
    p_value REAL,                 -- conformal p-value of the score: reject at a plant's alpha when p <= alpha
    hold_reason TEXT,             -- why the verdict is hold: the camera's open alarms, an unknown product
    product TEXT,                 -- the product on the line when the frame was taken ([watch.products])
    bundle_version INTEGER,       -- the version of the bundle that scored it (`inspect model BUNDLE list`)
    UNIQUE (path, size, mtime_ns)
)"""
_EVENTS = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,             -- unix seconds
    kind TEXT NOT NULL,           -- lighting | focus | camera | score (line/drift.py) | version
    name TEXT NOT NULL,           -- what the engineer reads: "lighting changed", ...
    state TEXT NOT NULL CHECK (state IN ('raised', 'cleared')),
    detail TEXT,
    folder TEXT                   -- the camera folder(s) of the lane
)"""
# What the station's polls read instead of the whole table: frames per second of scored_at by status,
# kept by each commit in its own transaction. Every frame of a second lies between its first_id and last_id.
_SECONDS = """
CREATE TABLE IF NOT EXISTS seconds (
    second INTEGER PRIMARY KEY,   -- floor(scored_at)
    ok INTEGER NOT NULL,
    ng INTEGER NOT NULL,
    error INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL,
    hold INTEGER NOT NULL DEFAULT 0
)"""
# The last rejects, found without reading the OK frames between them.
_NG_INDEX = "CREATE INDEX IF NOT EXISTS frames_ng ON frames (id) WHERE status = 'ng'"
# The newest row of each camera folder, kept by each commit: the cameras held now, without grouping the table.
_CAMERAS = "CREATE TABLE IF NOT EXISTS cameras (folder TEXT PRIMARY KEY, last_id INTEGER NOT NULL)"
# The newest event of each kind and camera ('' for none), kept by each event's insert: the alarms open now,
# without reading a month of events.
_ALARMS = ("CREATE TABLE IF NOT EXISTS alarms (kind TEXT NOT NULL, folder TEXT NOT NULL, "
           "event_id INTEGER NOT NULL, PRIMARY KEY (kind, folder))")
_SCHEMA = f"{_FRAMES};{_EVENTS};{_SECONDS};{_NG_INDEX};{_CAMERAS};{_ALARMS};"


# The table's columns in schema order (also the order of the JSON lines' keys).
_COLUMNS = ["path", "folder", "size", "mtime", "mtime_ns", "status", "score", "threshold", "detector", "backend",
            "latency_ms", "overlay", "error", "fallback_reason", "received_at", "scored_at", "health", "p_value",
            "hold_reason", "product", "bundle_version"]
_INSERT = (f"INSERT OR IGNORE INTO frames ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_TEXT_COLUMNS = ("path", "folder", "overlay", "error", "fallback_reason", "backend", "detector", "hold_reason",
                 "product")
_SELECT = f"SELECT id, {', '.join(_COLUMNS)} FROM frames"


def row_json(row: Record | dict) -> str:
    get = row.get if isinstance(row, dict) else functools.partial(getattr, row)
    return json.dumps({"id": get("id"), **{c: get(c) for c in _COLUMNS}})


class ResultStore:
    """Thread-safe: lanes commit concurrently, the intake thread looks frames up."""

    def __init__(self, out: Path, warn: Callable[[str], None] | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self._warn = warn or (lambda msg: None)
        self._lockfile = _exclusive_lock(out / ".watch.lock")
        self.db_path = out / "results.db"
        self.jsonl_path = out / "results.jsonl"
        self._lock = threading.Lock()
        # The day the mirror was last written, read before a repair appends to it.
        self._jsonl_day = day_of(self.jsonl_path.stat().st_mtime if self.jsonl_path.exists() else time.time())
        try:
            self._db = self._connect()
            self.reconciled = self._reconcile_jsonl()
        except (sqlite3.Error, OSError) as exc:
            self._lockfile.close()
            raise DiffinspectError(f"cannot use the results in {out} ({exc}); move results.db and "
                                   f"results.jsonl away to start afresh") from None
        self._jsonl: TextIO | None = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        self._jsonl_last = self._max_id()
        self._jsonl_behind = False
        self._idents = (_ident(self.db_path), _ident(self.jsonl_path))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            _migrate(db)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()
            raise
        return db

    def status_of(self, path: str, size: int, mtime_ns: int) -> str | None:
        with self._lock:
            hit = self._db.execute("SELECT status FROM frames WHERE path=? AND size=? AND mtime_ns=?",
                                   (storable(path), size, mtime_ns)).fetchone()
        return hit[0] if hit else None

    def commit(self, rows: list[Record]) -> list[Record]:
        """Commit a batch in one transaction; returns the rows that were new (ids set)."""
        for row in rows:  # the row as recorded is what the hooks, the mirror and the console see
            for c in _TEXT_COLUMNS:
                setattr(row, c, storable(getattr(row, c)))
        with self._lock:
            self._keep_files()
            self._rotate()
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                inserted = []
                for row in rows:
                    cur.execute(_INSERT, [getattr(row, c) for c in _COLUMNS])
                    if cur.rowcount == 1:
                        row.id = cur.lastrowid
                        inserted.append(row)
                _summarise(cur, inserted)
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute("ROLLBACK")
                for row in rows:
                    row.id = None
                raise
            try:
                self._mirror(inserted)
            except Exception:  # the rows are committed whatever happens to their mirror lines
                self._jsonl_behind = True
        return inserted

    def add_events(self, events: list[tuple[float, str, str, str, str, str | None]]) -> None:
        """(at, kind, name, state, detail, folder) rows into the events table, one transaction."""
        if not events:
            return
        with self._lock:
            self._keep_files()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for event in events:
                    event_id = self._db.execute("INSERT INTO events (at, kind, name, state, detail, folder) "
                                                "VALUES (?, ?, ?, ?, ?, ?)", event).lastrowid
                    self._db.execute(_LATEST_EVENT, (event[1], event[5] or "", event_id))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def retire(self, before: float, outputs: list[str], limit: int = 500) -> int:
        """One small retention step (store/retention.py): the oldest rows scored before `before` that
        every output in `outputs` (their mark keys) acknowledged go to OUT/archive/; returns how many.
        Rotated mirrors whose rows have all left go too."""
        with self._lock:
            n = archive_step(self._db, self.db_path.parent / "archive", before,
                             acknowledged_upto(self._db, outputs), limit)
            if n == 0:
                self._drop_rotated()
            return n

    def _drop_rotated(self) -> None:
        oldest = self._db.execute("SELECT scored_at FROM frames ORDER BY id LIMIT 1").fetchone()
        keep_from = day_of(oldest[0] if oldest else time.time())
        for path in self._rotated():
            if path.name[len("results-"):len("results-") + 10] < keep_from:
                path.unlink(missing_ok=True)

    def _rotated(self) -> list[Path]:
        return sorted(self.jsonl_path.parent.glob("results-*.jsonl"))

    def _rotate(self) -> None:
        """A new day: results.jsonl becomes results-<its day>.jsonl, and a new one starts (under the lock)."""
        today = day_of(time.time())
        if today == self._jsonl_day:
            return
        day, self._jsonl_day = self._jsonl_day, today  # tried once a day: a failure must not stop commits
        if self._jsonl is not None:
            with contextlib.suppress(OSError):
                self._jsonl.close()
            self._jsonl = None
        dest = self.jsonl_path.with_name(f"results-{day}.jsonl")
        n = 1
        while dest.exists():  # the clock went back: never overwrite a day
            dest = self.jsonl_path.with_name(f"results-{day}.{n}.jsonl")
            n += 1
        try:
            os.replace(self.jsonl_path, dest)
        except FileNotFoundError:
            pass
        except OSError as exc:  # the mirror goes on in the same file
            self._warn(f"{self.jsonl_path} not rotated ({exc})")
        try:
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError:
            self._jsonl_behind = True  # _mirror opens it and catches up
        self._idents = (self._idents[0], _ident(self.jsonl_path))

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(Exception):  # rows are worth a last check; closing must not fail
                self._keep_files()
            if self._jsonl is not None:
                with contextlib.suppress(OSError):
                    self._jsonl.close()
            self._db.close()
            self._lockfile.close()

    def _keep_files(self) -> None:
        """results.db or results.jsonl deleted or replaced while watching: write it again (under the lock)."""
        db_ident, jsonl_ident = _ident(self.db_path), _ident(self.jsonl_path)
        if db_ident != self._idents[0]:
            self._restore_db()
        if jsonl_ident != self._idents[1]:
            if self._jsonl is not None:
                with contextlib.suppress(OSError):
                    self._jsonl.close()
                self._jsonl = None
            self._warn(f"{self.jsonl_path} was deleted or replaced while watching: written again from results.db")
            self._set_aside(self.jsonl_path)
            self.reconciled += self._reconcile_jsonl()
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            self._jsonl_last, self._jsonl_behind = self._max_id(), False
        self._idents = (_ident(self.db_path), _ident(self.jsonl_path))

    def _restore_db(self) -> None:
        """Copy the open (unlinked) database to its path again; what replaced it is kept aside."""
        tmp = self.db_path.with_name(".results.db.restoring")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        copy = sqlite3.connect(tmp)
        try:
            self._db.backup(copy)
        finally:
            copy.close()
        self._db.close()
        # The old database's log and index stay behind while another connection (the station view, an
        # output) holds them; the restored file must not start from them.
        for log in (self.db_path.with_name(self.db_path.name + "-wal"),
                    self.db_path.with_name(self.db_path.name + "-shm")):
            log.unlink(missing_ok=True)
        self._set_aside(self.db_path)
        os.replace(tmp, self.db_path)
        self._db = self._connect()
        self._warn(f"{self.db_path} was deleted or replaced while watching: written again from the open "
                   f"database ({self._max_id()} rows kept)")

    @staticmethod
    def _set_aside(path: Path) -> None:
        """A file someone put in our place is renamed, never deleted."""
        if path.exists():
            os.replace(path, path.with_name(f"{path.name}.replaced-{int(time.time())}"))

    # -- the JSONL mirror ----------------------------------------------------------------------

    def _mirror(self, inserted: list[Record]) -> None:
        """Append after the commit. A failed write (disk full) is caught up from the table later,
        so the file stays an in-order prefix of the table."""
        if self._jsonl_behind:
            lines = [row_json(r) for r in self._rows_after(self._jsonl_last)]
        else:
            lines = [row_json(r) for r in inserted]
        if not lines:
            return
        good: int | None = None
        try:
            if self._jsonl is None:
                self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115
            good = self._jsonl.tell()
            self._jsonl.write("\n".join(lines) + "\n")
            self._jsonl.flush()
        except OSError:
            self._jsonl_behind = True
            if self._jsonl is not None:
                # Drop the file object with whatever it still buffers, then cut the torn line by
                # path: the next write starts on a line boundary.
                with contextlib.suppress(OSError):
                    self._jsonl.close()
                if good is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(self.jsonl_path, good)
                self._jsonl = None
            return
        self._jsonl_last = json.loads(lines[-1])["id"]
        self._jsonl_behind = False

    def _reconcile_jsonl(self) -> int:
        """Make the JSONL match the table after a crash; returns how many lines were written."""
        db_max = self._max_id()
        last = _last_jsonl_id(self.jsonl_path)
        rotated = self._rotated_last()
        if last == 0:  # empty or missing (rotated just now): it goes on after the rotated days
            last = rotated
        if last == db_max:
            return 0
        if last is None or last > db_max:
            # Unreadable, or lines whose commit never happened: the table is the truth.
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                n = self._write_rows(f, rotated or 0)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.jsonl_path)
            return n
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            return self._write_rows(f, last)

    def _write_rows(self, f, after_id: int) -> int:  # noqa: ANN001
        n = 0
        for row in self._rows_after(after_id):
            f.write(row_json(row) + "\n")
            n += 1
        return n

    def _rows_after(self, after_id: int):  # noqa: ANN202 (a cursor of dicts)
        cur = self._db.execute(f"{_SELECT} WHERE id > ? ORDER BY id", (after_id,))
        names = [d[0] for d in cur.description]
        for values in cur:
            yield dict(zip(names, values, strict=True))

    def _rotated_last(self) -> int:
        """The last id the rotated mirrors hold (0 without any)."""
        return max([_last_jsonl_id(p) or 0 for p in self._rotated()], default=0)

    def _max_id(self) -> int:
        """The newest id ever committed: retention deletes the oldest rows, and may delete them all."""
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'frames'").fetchone()
        return seq[0] if seq else 0


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _migrate(db: sqlite3.Connection) -> None:
    """The schema, with what results.db files written by older versions lack (inside a transaction)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    cols = {r[1] for r in db.execute("PRAGMA table_info(frames)")}
    for name, kind in (("health", "TEXT"), ("p_value", "REAL"), ("hold_reason", "TEXT"), ("product", "TEXT"),
                       ("bundle_version", "INTEGER")):
        if cols and name not in cols:
            db.execute(f"ALTER TABLE frames ADD COLUMN {name} {kind}")
    sql = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'frames'").fetchone()
    if sql and "'hold'" not in sql[0]:
        _allow_hold(db)
    if "seconds" in tables and "hold" not in {r[1] for r in db.execute("PRAGMA table_info(seconds)")}:
        db.execute("ALTER TABLE seconds ADD COLUMN hold INTEGER NOT NULL DEFAULT 0")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    migrate_reviews(db)
    # The summaries of rows from before them: made once, here (a full read of the table, only this once)
    if "frames" in tables and "cameras" not in tables:
        db.execute("INSERT INTO cameras (folder, last_id) SELECT folder, MAX(id) FROM frames GROUP BY folder")
    if "events" in tables and "alarms" not in tables:
        db.execute("INSERT INTO alarms (kind, folder, event_id) SELECT kind, COALESCE(folder, ''), MAX(id) "
                   "FROM events GROUP BY 1, 2")
    if "frames" in tables and "seconds" not in tables:
        db.execute(f"INSERT INTO seconds (second, ok, ng, error, first_id, last_id, hold) SELECT s, "
                   f"SUM(status = 'ok'), SUM(status = 'ng'), SUM(status = 'error'), MIN(id), MAX(id), "
                   f"SUM(status = 'hold') FROM (SELECT {SECOND_SQL} s, status, id FROM frames) GROUP BY s")


def _allow_hold(db: sqlite3.Connection) -> None:
    """SQLite cannot change a CHECK constraint in place: the frames table is copied into one whose status
    may also be 'hold', ids and the id sequence kept (inside the caller's transaction)."""
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'frames'").fetchone()
    db.execute("ALTER TABLE frames RENAME TO frames_before_hold")
    db.execute(_FRAMES)
    names = ", ".join(["id", *_COLUMNS])
    db.execute(f"INSERT INTO frames ({names}) SELECT {names} FROM frames_before_hold")
    db.execute("DROP TABLE frames_before_hold")
    if seq is not None:
        db.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'frames'", (seq[0],))


_COUNT_SECOND = ("INSERT INTO seconds (second, ok, ng, error, first_id, last_id, hold) VALUES (?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT (second) DO UPDATE SET ok = ok + excluded.ok, ng = ng + excluded.ng, "
                 "error = error + excluded.error, hold = hold + excluded.hold, "
                 "first_id = MIN(first_id, excluded.first_id), last_id = MAX(last_id, excluded.last_id)")


_LATEST_ROW = ("INSERT INTO cameras (folder, last_id) VALUES (?, ?) "
               "ON CONFLICT (folder) DO UPDATE SET last_id = MAX(last_id, excluded.last_id)")
_LATEST_EVENT = ("INSERT INTO alarms (kind, folder, event_id) VALUES (?, ?, ?) "
                 "ON CONFLICT (kind, folder) DO UPDATE SET event_id = MAX(event_id, excluded.event_id)")


def _summarise(cur: sqlite3.Cursor, inserted: list[Record]) -> None:
    """Add the new rows to the seconds and cameras tables, in the transaction that inserts them."""
    seconds: dict[int, dict[str, int]] = {}
    newest: dict[str, int] = {}
    for row in inserted:
        newest[row.folder] = max(newest.get(row.folder, 0), row.id)
        s = seconds.setdefault(math.floor(row.scored_at), {"ok": 0, "ng": 0, "error": 0, "hold": 0,
                                                            "first": row.id, "last": row.id})
        s[row.status] += 1
        s["first"], s["last"] = min(s["first"], row.id), max(s["last"], row.id)
    cur.executemany(_COUNT_SECOND, [(second, c["ok"], c["ng"], c["error"], c["first"], c["last"], c["hold"])
                                    for second, c in seconds.items()])
    cur.executemany(_LATEST_ROW, list(newest.items()))


def _last_jsonl_id(path: Path) -> int | None:
    """Id of the last complete line (0 for an empty or missing file), cutting off a torn last line;
    None when the file cannot be trusted."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        start = max(0, size - (1 << 20))
        f.seek(start)
        tail = f.read()
        cut = tail.rfind(b"\n")
        if cut < 0:
            if start > 0:
                return None
            f.truncate(0)  # a single torn line: nothing was complete
            return 0
        if cut != len(tail) - 1:
            f.truncate(start + cut + 1)  # the crash tore the last line
        lines = tail[:cut].rsplit(b"\n", 1)
        try:
            return int(json.loads(lines[-1])["id"])
        except (ValueError, KeyError, TypeError):
            return None


class _LockFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)  # closing releases the flock (so does the process dying, even by kill -9)


def _exclusive_lock(path: Path) -> _LockFile:
    """Two watchers on one OUT would interleave the JSONL mirror: refuse the second."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # not POSIX: no guard
        return _LockFile(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DiffinspectError(f"another `inspect watch` is already writing to {path.parent}") from None
    except OSError:
        pass  # a filesystem without locks: run unguarded rather than not at all
    return _LockFile(fd)
