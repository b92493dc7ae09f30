"""The operator's word on verdicts: the `reviews` table of results.db.

A review says what a person found when looking again at a frame's part: a reject that is a "good" part
(a false reject), or an OK frame that is a "defect" (a miss), or a verdict confirmed. It never changes the
frame's row: the verdict was delivered when it was committed. The review keeps a copy of what it judged
(the frame's identity, status, score and threshold), so it outlives the frame's row leaving for the archive.

The station writes reviews through a `ReviewWriter`: its own connection, one short transaction per review,
and a short busy timeout, so a review waits for the committer (and never the other way round for long).
The latest review of a frame is the one that counts (an operator may correct a slip). Each review also keeps,
in its transaction, what the station's poll reads instead of grouping the whole table: each reviewed frame's
latest review (`latest_reviews`) and how many frames' latest review is of each status and verdict
(`review_counts`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from diffinspect import DiffinspectError
from diffinspect.store.reader import ResultsReader

VERDICTS = ("good", "defect")  # what the reviewer found: a good part, or a defect
REVIEWED_STATUSES = ("ok", "ng")  # the verdicts a person can review (held and error frames have none)
MAX_NOTE = 500
T = TypeVar("T")
REVIEWS_TABLE = """
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    frame_id INTEGER NOT NULL,    -- frames.id (the row may since have left for the archive)
    verdict TEXT NOT NULL CHECK (verdict IN ('good', 'defect')),
    note TEXT,
    who TEXT NOT NULL,            -- the review token's name
    at REAL NOT NULL,             -- unix seconds
    status TEXT NOT NULL,         -- the frame's verdict as delivered: ok | ng
    score REAL,
    threshold REAL,
    scored_at REAL NOT NULL,
    path TEXT NOT NULL,           -- the frame's identity: where it was found, size, mtime_ns
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL
)"""
REVIEWS_INDEX = "CREATE INDEX IF NOT EXISTS reviews_frame ON reviews (frame_id)"
# What a poll reads, kept by each review: the earliest reviewed frame (an index), each frame's latest review
# (the misses among them indexed apart), and the frames by status and verdict of their latest review.
SUMMARY = (
    "CREATE INDEX IF NOT EXISTS reviews_scored ON reviews (scored_at)",
    "CREATE TABLE IF NOT EXISTS latest_reviews (frame_id INTEGER PRIMARY KEY, review_id INTEGER NOT NULL UNIQUE, "
    "status TEXT NOT NULL, verdict TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS latest_misses ON latest_reviews (review_id) WHERE status = 'ok' AND verdict = 'defect'",
    "CREATE TABLE IF NOT EXISTS review_counts (status TEXT NOT NULL, verdict TEXT NOT NULL, frames INTEGER NOT NULL, "
    "PRIMARY KEY (status, verdict))",
)


def migrate(db: sqlite3.Connection) -> None:
    """The reviews table and its summaries (inside the caller's transaction); the summaries of reviews written
    before them are made here, once."""
    had = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for statement in (REVIEWS_TABLE, REVIEWS_INDEX, *SUMMARY):
        db.execute(statement)
    if "latest_reviews" not in had:
        db.execute("INSERT INTO latest_reviews (frame_id, review_id, status, verdict) SELECT frame_id, id, status, "
                   "verdict FROM reviews WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY frame_id)")
        db.execute("INSERT INTO review_counts (status, verdict, frames) SELECT status, verdict, COUNT(*) "
                   "FROM latest_reviews GROUP BY status, verdict")


def _summarise(db: sqlite3.Connection, review: sqlite3.Row) -> None:
    """A new review in the summaries: it replaces its frame's latest review, if any, in the counts too."""
    before = db.execute("SELECT status, verdict FROM latest_reviews WHERE frame_id = ?", (review["frame_id"],))
    for status, verdict in before.fetchall():
        db.execute("UPDATE review_counts SET frames = frames - 1 WHERE status = ? AND verdict = ?", (status, verdict))
    db.execute("INSERT INTO latest_reviews (frame_id, review_id, status, verdict) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (frame_id) DO UPDATE SET review_id = excluded.review_id, status = excluded.status, "
               "verdict = excluded.verdict", (review["frame_id"], review["id"], review["status"], review["verdict"]))
    db.execute("INSERT INTO review_counts (status, verdict, frames) VALUES (?, ?, 1) "
               "ON CONFLICT (status, verdict) DO UPDATE SET frames = frames + 1", (review["status"], review["verdict"]))


class ReviewWriter:
    """Adds reviews to results.db (a context manager). It writes no table but the reviews and their summaries."""

    def __init__(self, db_path: Path, timeout: float = 2.0) -> None:
        if not Path(db_path).is_file():
            raise DiffinspectError(f"no results in {Path(db_path).parent} yet: nothing to review")
        self._db = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=FULL")  # a person's word is not re-sent by anyone: keep it
        # A results.db of a watcher older than reviews (or their summaries) has none yet: made once, here.
        self._transaction(lambda: migrate(self._db))

    def add(self, frame_id: int, verdict: str, who: str, note: str | None = None) -> dict[str, Any] | None:
        """Record a review of frame `frame_id`; returns it, or None when no such OK or NG frame exists."""
        if verdict not in VERDICTS:
            raise DiffinspectError(f"a review says one of {VERDICTS}, got {verdict!r}")
        note = (note or "").strip()[:MAX_NOTE] or None

        def insert() -> sqlite3.Row | None:
            cur = self._db.execute(
                "INSERT INTO reviews (frame_id, verdict, note, who, at, status, score, threshold, scored_at, path, "
                "size, mtime_ns) SELECT id, ?, ?, ?, ?, status, score, threshold, scored_at, path, size, mtime_ns "
                f"FROM frames WHERE id = ? AND status IN {REVIEWED_STATUSES}",
                (verdict, note, who, time.time(), frame_id))
            if cur.rowcount != 1:
                return None
            review = self._db.execute("SELECT * FROM reviews WHERE id = ?", (cur.lastrowid,)).fetchone()
            _summarise(self._db, review)
            return review

        review = self._transaction(insert)
        return None if review is None else dict(review)

    def _transaction(self, work: Callable[[], T]) -> T:
        """work() in one write transaction, rolled back if it raises."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        return result

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReviewWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def all_reviews(db_path: Path) -> list[dict[str, Any]]:
    """Every review in OUT/results.db, oldest first (a correction and what it corrected both)."""
    try:
        with ResultsReader(db_path) as db:
            return db.reviews()
    except sqlite3.Error as exc:
        raise DiffinspectError(f"cannot read the reviews in {db_path}: {exc}") from None


CSV_COLUMNS = ("id", "frame_id", "verdict", "note", "who", "at", "status", "score", "threshold", "scored_at", "path",
               "size", "mtime_ns")


def write_csv(reviews: list[dict[str, Any]], f: TextIO) -> None:
    """The reviews as CSV, their times in ISO 8601 (UTC)."""
    import datetime as dt

    out = csv.writer(f)
    out.writerow(CSV_COLUMNS)
    for r in reviews:
        row = {**r, **{k: dt.datetime.fromtimestamp(r[k], dt.timezone.utc).isoformat(timespec="seconds")
                       for k in ("at", "scored_at")}}
        out.writerow([row.get(c) for c in CSV_COLUMNS])


def frame_file(out: Path, review: dict[str, Any]) -> Path | None:
    """The frame file a review judged, where it still is: where the camera wrote it, or where `inspect watch
    --after move` put it (OUT/<status>/ under its name, or its name with -N when one was taken); None when
    it is gone or is another file now (the identity is its size and mtime_ns)."""
    path = Path(review["path"])
    candidates = [path, *sorted((out / review["status"]).glob(f"{glob_escape(path.stem)}*{glob_escape(path.suffix)}"))]
    for candidate in candidates:
        with contextlib.suppress(OSError):
            st = os.stat(candidate)
            if (st.st_size, st.st_mtime_ns) == (review["size"], review["mtime_ns"]):
                return candidate
    return None


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def reviewed_good_files(out: Path) -> tuple[list[Path], int]:
    """The files of the frames whose latest review says "good part", and how many of them are gone."""
    db_path = Path(out) / "results.db"
    if not db_path.is_file():
        raise DiffinspectError(f"no results.db in {out}: name the results folder of `inspect watch`")
    reviews = {r["frame_id"]: r for r in all_reviews(db_path)}  # the latest per frame wins
    found = [frame_file(Path(out), r) for r in reviews.values() if r["verdict"] == "good"]
    return [p for p in found if p is not None], sum(p is None for p in found)
