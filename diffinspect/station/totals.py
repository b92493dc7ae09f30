"""Frames by status per whole second, kept between the station's polls.

The page's counts (the hour, the shift) and its trend (per minute over the hour) are sums over the seconds
table the committer keeps (store/results.py). A second older than SETTLE_S gets no more rows (a row's
scored_at is the time of its own commit), so it is read once and kept in running totals: a poll reads only
the seconds since the previous poll and the last SETTLE_S, however long the shift.
"""

from __future__ import annotations

from diffinspect.store.reader import STATUSES, ResultsReader

SETTLE_S = 10
KEEP_S = 86400 + 3600  # the longest span a poll asks for: a shift of a whole day, and the hour
ZERO = (0,) * len(STATUSES)


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


class Totals:
    """Running totals of frames by status over the seconds of one results.db (any second from `first` on)."""

    def __init__(self) -> None:
        self._start = 0
        self._cum: list[tuple[int, ...]] = [ZERO]  # _cum[i]: frames of the seconds [_start, _start + i)
        self._settled = 0
        self._max_id = 0
        self._live: dict[int, tuple[int, ...]] = {}
        self._since: tuple[float, int, tuple[int, ...]] | None = None  # (t, end, frames of [t, end)): since()

    def update(self, db: ResultsReader, first: int, now: int, max_id: int) -> None:
        """Read the seconds settled since the last update and those still open. Starts again from `first`
        after a gap, a clock that went back, or a database with fewer rows than before (another one)."""
        settled, end = now - SETTLE_S, self._start + len(self._cum) - 1
        if not self._start <= first <= end or first - self._start > KEEP_S or settled < end or max_id < self._max_id:
            self._start, self._cum, end = first, [ZERO], first
        if max_id < self._max_id:  # another database: since() starts again too
            self._since = None
        if settled > end:
            got = {s: tuple(c) for s, *c in db.second_counts(end, settled)}
            run = self._cum[-1]
            for s in range(end, settled):
                run = _add(run, got[s]) if s in got else run
                self._cum.append(run)
        self._settled, self._max_id = settled, max_id
        self._live = {s: tuple(c) for s, *c in db.second_counts(settled)}

    def count(self, a: int, b: int | None = None) -> dict[str, int]:
        """Frames scored in the seconds [a, b) (without b: from a on), a no earlier than `first`."""
        s = self._settled
        lo, hi = min(a, s), s if b is None else min(b, s)
        total = ZERO
        if hi > lo:
            total = tuple(x - y for x, y in zip(self._cum[hi - self._start], self._cum[lo - self._start],
                                                strict=True))
        for second, c in self._live.items():
            if second >= a and (b is None or second < b):
                total = _add(total, c)
        return dict(zip(STATUSES, total, strict=True))

    def since(self, db: ResultsReader, t: float) -> dict[str, int]:
        """Frames scored at or after t, however long ago (the span of the reviews, after update()): the settled
        seconds are summed once and kept, so a poll reads only the seconds settled since the last one."""
        settled = self._settled
        if t >= settled:
            return db.status_counts(t)
        kept = self._since
        if kept is None or kept[0] != t or kept[1] > settled:  # another t, or a clock that went back
            kept = (t, settled, tuple(db.status_counts(t, until=settled).values()))
        total = kept[2]
        for _, *c in db.second_counts(kept[1], settled):  # the seconds settled since the last poll
            total = _add(total, tuple(c))
        self._since = (t, settled, total)
        for c in self._live.values():  # the seconds from `settled` on
            total = _add(total, c)
        return dict(zip(STATUSES, total, strict=True))
