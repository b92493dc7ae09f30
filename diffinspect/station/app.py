"""`inspect station OUT`: one live web page over OUT/results.db for the people at the line.

It reads results.db through the store's read-only queries (store/reader.py), so the page can neither
slow nor break scoring, and it never creates a file in OUT. It binds to 127.0.0.1 by default; on any
other address it refuses to start without a token, and with a token every request must carry it
(`?token=`, or `Authorization: Bearer`). Without a token the Host header must name the bound address
(or a `--server-name`): a page from another site whose name a DNS rebinding points at 127.0.0.1 gets
nothing. From OUT only images are served (overlays and moved frames, the thumbnails of the rejects),
resolved with symlinks followed and kept inside OUT; every response carries a CSP without inline script
and `X-Content-Type-Options: nosniff`.

Reviews are the one thing the station writes: with a review token (`--review-token NAME=SECRET`, distinct
from the read token) an operator marks a reject "good part" or an OK frame "defect" (POST /api/review, the
token in the X-Review-Token header, never a cookie). Each goes to the reviews table through the store's
ReviewWriter (its own short transaction); the frames table stays read-only here, so no delivered verdict
changes. The first review creates results.db's -wal and -shm files when no watcher holds them.

The page is plain HTML, JS and SVG (no CDN: plant networks are offline), shipped as the package files
static/index.html, app.js and style.css, and polls /api/state. The two assets hold no results and are the
same on every install, so they are served without the token (a browser does not pass `?token=` on to them).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
import math
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from diffinspect import DiffinspectError
from diffinspect.station.reviewed import LAST as LAST_REVIEWS
from diffinspect.station.reviewed import summary as review_summary
from diffinspect.station.totals import Totals
from diffinspect.store import BANDS_FILE, StoreError
from diffinspect.store.reader import STATUSES, ResultsReader, explain
from diffinspect.store.reviews import VERDICTS, ReviewWriter

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SIGNAL_NAMES = ("brightness", "contrast", "sharpness", "shift")
DEFAULT_SHIFTS = "06:00,14:00,22:00"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
RECENT_ROWS = 100_000  # rejects are looked for among this many latest rows
STALE_S = 2  # how old a state a poll may get while the next is computed (the page polls every 2 s)
# What /files/ serves: images a browser shows, never as active content (no SVG, no HTML)
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp"}


class Unreadable(DiffinspectError):
    """results.db is there but cannot be read now: the page says this line (HTTP 503)."""


def parse_shifts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            h, m = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise DiffinspectError(f"shift start {part.strip()!r} is not HH:MM") from None
        if not (0 <= h < 24 and 0 <= m < 60):
            raise DiffinspectError(f"shift start {part.strip()!r} is not a time of day")
        out.append((h, m))
    if not out:
        raise DiffinspectError("name at least one shift start (HH:MM)")
    return sorted(out)


def shift_start(now: float, shifts: list[tuple[int, int]]) -> float:
    """Unix time of the latest shift start at or before now (local time)."""
    day = dt.datetime.fromtimestamp(now)
    starts = [day.replace(hour=h, minute=m, second=0, microsecond=0) for h, m in shifts]
    starts += [s - dt.timedelta(days=1) for s in starts]
    return max(s for s in starts if s.timestamp() <= now).timestamp()


class Station:
    """The data side of the page: the store's read-only queries over OUT/results.db, paths confined to OUT."""

    def __init__(self, out: Path, shifts: str = DEFAULT_SHIFTS, bound: dict[str, Any] | None = None,
                 reviewing: bool = False) -> None:
        self.bound = bound  # the calibrated false-reject bound of the line's bundle, when the station was told
        self.reviewing = reviewing  # review tokens were given: the page offers the review controls
        self.out = Path(out).resolve()
        if not self.out.is_dir():
            raise DiffinspectError(f"results folder not found: {out}")
        self.db_path = self.out / "results.db"
        self.shifts = parse_shifts(shifts)
        self._computing = threading.Lock()  # one computation of the state at a time
        self._last: tuple[int, dict[str, Any], bytes] | None = None  # (second, state, JSON body)
        self._totals = Totals()  # the settled seconds' counts, kept between polls (the whole seconds of state())
        self._said: set[str] = set()  # why computations in the background failed: each said once

    def state(self, now: float | None = None) -> dict[str, Any]:
        """What the page shows (at `now`, by default this second); raises Unreadable when results.db is there
        but cannot be read."""
        return self._compute(now) if now is not None else self._now()[0]

    def state_json(self) -> bytes:
        """state() as the JSON body of /api/state. While the state of one of the last STALE_S seconds is there,
        a poll gets it at once and the next one is computed meanwhile in another thread: no poll waits for a
        computation but the first (and the first after a pause)."""
        now, last = math.floor(time.time()), self._last
        if last is None or now - last[0] > STALE_S:
            return self._now()[1]
        if last[0] != now and self._computing.acquire(blocking=False):
            try:
                threading.Thread(target=self._refresh, args=(now,), name="station-state", daemon=True).start()
            except RuntimeError:  # no thread to be had: the lock must not stay taken, or every poll waits
                self._computing.release()
                raise
        return last[2]

    def _refresh(self, now: int) -> None:
        """The next state, in the background. When that fails, the last state is dropped, so the next poll
        computes its own and answers with the error (a 503 naming it, for a database it cannot read) or, once
        the fault is gone, with a fresh state; each distinct failure is logged once."""
        try:
            self._store(now)
        except Exception as exc:
            self._last = None
            why = f"{type(exc).__name__}: {exc}"
            if why not in self._said:
                self._said.add(why)
                log.warning("station: the page's state could not be computed (%s); the next poll tries again", why)
        finally:
            self._computing.release()

    def _now(self) -> tuple[dict[str, Any], bytes]:
        # One computation and one JSON body a second, however many browsers poll: the page's cost on the cores
        # that score frames does not grow with its audience. A whole second, so that every edge of the hour,
        # its minutes and the shift is one of a second, and the counts come from the totals kept between polls
        # (rows scored since are counted all the same).
        now = math.floor(time.time())
        with self._computing:
            last = self._last
            if last is None or last[0] != now:
                last = self._store(now)
        return last[1], last[2]

    def _store(self, now: int) -> tuple[int, dict[str, Any], bytes]:
        state = self._compute(now, kept=True)
        self._last = (now, state, json.dumps(state, separators=(",", ":"), allow_nan=False).encode())
        return self._last

    def _compute(self, now: float, kept: bool = False) -> dict[str, Any]:
        base: dict[str, Any] = {"out": str(self.out), "now": now, "ready": False}
        return _finite(self._read(lambda db: {**base, "ready": True, **self._state(db, now, kept)}, base))

    def _read(self, query: Callable[[ResultsReader], Any], default: Any) -> Any:  # noqa: ANN401
        """query(reader) on results.db, or default while there is none yet (or no table: a watcher starting)."""
        for _ in range(3):  # a writer that touched a database read as it lay: read again
            try:
                db = ResultsReader.open(self.db_path)
                if db is None:
                    return default
                with db:
                    if not db.tables():
                        return default
                    result = query(db)
                    if db.unchanged():
                        break
                    self._totals = Totals()  # what it read may be torn
            except StoreError as exc:
                line = explain(exc, self.db_path)
                raise Unreadable(line or f"{self.db_path} is busy ({exc}); trying again") from None
        return result

    def _state(self, db: ResultsReader, now: float, kept: bool) -> dict[str, Any]:
        """The page's state; its counts from the totals kept between polls (`kept`, a whole second `now`), or
        read afresh."""
        hour, shift = now - 3600, shift_start(now, self.shifts)
        max_id = db.max_id()
        recent_id = max(0, max_id - RECENT_ROWS)
        totals = self._totals
        if not kept:
            count_since, per_minute = db.status_counts, db.per_window(hour, 60.0, 61)
        else:
            totals.update(db, int(min(hour, shift)), int(now), max_id)
            count_since = lambda t: totals.count(int(t))  # noqa: E731
            per_minute = [totals.count(int(hour) + 60 * i, int(hour) + 60 * (i + 1)) for i in range(61)]
        counts = {}
        for key, start in (("hour", hour), ("shift", shift)):
            c = count_since(start)
            n = sum(c.values())
            span_min = max((now - start) / 60.0, 1e-9)
            counts[key] = {"total": n, **c, "per_minute": n / span_min, "since": start}
        # OK/NG/error per minute over the last hour; the last minute also takes what is scored this very second.
        trend = [{"t": hour + 60 * i, **c} for i, c in enumerate(per_minute)]
        late = trend.pop()  # scored this very second (or by a clock a little ahead): the last minute
        for status in STATUSES:
            trend[-1][status] += late[status]
        lat = sorted(v for v in db.latencies(last=2000) if v is not None)
        last = db.last_scored(after=recent_id)
        product = None if last is None else last.get("product")
        scored, fallback = db.fallback_count(after=recent_id, last=200)
        rejects = [self._frame(r) for r in db.rejects(after=recent_id, last=12)]
        health = []
        for r in db.health(after=recent_id, last=300, product=product):
            values = _json(r["health"])
            if isinstance(values, dict):
                health.append({"id": r["id"], "t": r["scored_at"], "folder": r["folder"],
                               **{k: _num(values.get(k)) for k in SIGNAL_NAMES}})
        health.reverse()
        published = self._published()
        return {
            "counts": counts, "trend": trend, "max_id": max_id,
            "latency": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "n": len(lat)},
            "detector": None if last is None else {
                "detector": last["detector"], "backend": last["backend"], "fallback_reason": last["fallback_reason"],
                "fallback_share": fallback / scored if scored else 0.0,
                "threshold": last["threshold"], "at": last["scored_at"], "version": last.get("bundle_version"),
                # what this threshold guarantees, as `inspect calibrate` and `info` say it
                "guarantee": (published.get("guarantees", {}).get(last["folder"]) or {}).get(last["detector"])},
            # Scores of the product on the line now (each product has its bundle, so its own scale).
            "histogram": _histogram(db.scores(after=recent_id, last=2000, product=product),
                                    last["detector"] if last else None) | {"product": product},
            "products": [{"product": p, "total": sum(c.values()), **c}
                         for p, c in sorted(db.product_counts(after=recent_id, last=2000).items())],
            "rejects": rejects, "health": health, "bands": _bands(published, product),
            # The drift and disk alarms open now (a "version" event, a lane swapping bundle versions, is news,
            # not an alarm that stays open), and the newest events, newest first.
            "alarms": [e for e in db.alarms() if e["kind"] != "version"], "events": db.events(last=50)[::-1],
            "reviewing": self.reviewing,
            # Cameras whose verdicts are held now (on_alarm = "hold"): why, and since which frame.
            "hold": db.held(after=recent_id),
            "frames": [self._frame(r) for r in db.last_frames(last=12)],
            "reviews": self._reviews(db, (lambda t: totals.since(db, t)) if kept else db.status_counts),
        }

    def _reviews(self, db: ResultsReader, counts_since: Callable[[float], dict[str, int]]) -> dict[str, Any]:
        """The operators' reviews: measured rates beside the calibrated bound (station/reviewed.py), from the
        summaries each review keeps; counts_since(t): the frames by status scored since t."""
        tally = db.review_tally(last=LAST_REVIEWS)
        for r in (*tally.last, *tally.last_misses):
            r["name"] = Path(r["path"]).name
        return review_summary(tally, counts_since, self.bound)

    def review(self, frame_id: int, verdict: str, who: str, note: str | None) -> dict[str, Any] | None:
        """Record a review (the one write the station makes, to the reviews table); None: no such OK or NG
        frame. Raises Unreadable when results.db is busy for longer than a moment."""
        try:
            with ReviewWriter(self.db_path) as writer:
                return writer.add(frame_id, verdict, who, note)
        except StoreError as exc:
            raise Unreadable(explain(exc, self.db_path) or f"{self.db_path} is busy ({exc}); try again") from None

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        if not 0 < frame_id < 2**63:  # no such row id in SQLite
            return None
        def read(db: ResultsReader) -> dict[str, Any] | None:
            row = db.frame(frame_id)
            return None if row is None else {**row, "review": db.review_of(frame_id)}

        row = self._read(read, None)
        return None if row is None else _finite(self._frame(row))

    def _frame(self, d: dict[str, Any]) -> dict[str, Any]:
        d["name"] = Path(d["path"]).name
        d["overlay_url"] = self._file_url(d.get("overlay"))
        d["overlay"] = None
        d["health"] = _json(d.get("health")) if d.get("health") else None
        return d

    def _published(self) -> dict[str, Any]:
        """What the watcher publishes in OUT/station.json: "bands" and "lanes" (the calibrated health bands,
        the latest and per camera [product]) and "guarantees" (per camera folder and detector, what its
        threshold guarantees, in one sentence); each part a dict, or left out."""
        path = self.out / BANDS_FILE
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)}

    # -- files inside OUT ------------------------------------------------------------------------

    def _file_url(self, path: str | None) -> str | None:
        if not path:
            return None
        try:
            rel = Path(path).resolve().relative_to(self.out)
        except (ValueError, OSError):
            return None
        return "/files/" + urllib.parse.quote(rel.as_posix())

    def resolve_file(self, rel: str) -> Path | None:
        """The image OUT/rel, or None when rel leaves OUT (.., absolute, a symlink out) or is no image file."""
        if not rel or "\x00" in rel or os.path.isabs(rel):
            return None
        try:
            path = (self.out / rel).resolve(strict=True)
            path.relative_to(self.out)
        except (ValueError, OSError, RuntimeError):
            return None
        if not path.is_file() or path.suffix.lower() not in IMAGE_TYPES:
            return None
        return path


def _bands(published: dict[str, Any], product: str | None) -> dict[str, Any]:
    """The calibrated bands of the bundle scoring now: the product's on the line, else the latest published."""
    lanes = published.get("lanes", {})
    bands = next((b for k, b in lanes.items() if product is not None and k.endswith(f" [{product}]")),
                 published.get("bands"))
    return bands if isinstance(bands, dict) else {}


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    k = (len(values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _histogram(rows: list[tuple], detector: str | None, bins: int = 30) -> dict[str, Any]:
    """Scores of the current detector (the fallback's scores are on another scale)."""
    rows = [(s, t) for s, t, d in rows if d == detector and s is not None and math.isfinite(s)]
    if not rows:
        return {"edges": [], "counts": [], "threshold": None, "detector": detector}
    scores = [s for s, _ in rows]
    thr = rows[0][1]
    lo = min(min(scores), thr if thr is not None else math.inf)
    hi = max(max(scores), thr if thr is not None else -math.inf)
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / bins
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, int((s - lo) / width))] += 1
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts, "threshold": thr,
            "detector": detector, "n": len(scores)}


# ---------------------------------------------------------------------------------------------
# The web app


def create_app(out: Path, token: str | None = None, shifts: str = DEFAULT_SHIFTS, host: str = "127.0.0.1",
               server_names: tuple[str, ...] = (), reviewers: dict[str, str] | None = None,
               bound: dict[str, Any] | None = None):  # noqa: ANN201 (Starlette)
    """reviewers: {name: secret} of the review tokens (POST /api/review needs one in X-Review-Token); bound:
    the calibrated false-reject bound of the line's bundle, shown beside the measured rate."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    station = Station(out, shifts, bound, reviewing=bool(reviewers))
    reviewers = reviewers or {}
    page_html = static_file("index.html").decode()
    assets = {name: static_file(name) for name in ASSETS}
    names = {_host_name(host), *(_host_name(n) for n in server_names)} | (LOOPBACK if host in LOOPBACK else set())
    headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    class Guard:
        """Every request: the Host (without a token) or the token; every response: the security headers."""

        def __init__(self, app) -> None:  # noqa: ANN001
            self.app = app

        async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return

            async def send_secured(message) -> None:  # noqa: ANN001
                if message["type"] == "http.response.start":
                    given = {k.lower() for k, _ in message.get("headers", [])}
                    message["headers"] = [*message.get("headers", []), *(h for h in headers if h[0] not in given)]
                await send(message)

            request = Request(scope)
            refusal = None
            if token is None and _host_name(request.headers.get("host", "")) not in names:
                refusal = PlainTextResponse("unknown Host: the station answers only to the address it is bound "
                                            "to (add --server-name NAME to reach it by NAME)", status_code=421)
            elif token is not None and not request.url.path.startswith("/static/") and not _authorized(request, token):
                refusal = PlainTextResponse("token required", status_code=401)
            await (self.app if refusal is None else refusal)(scope, receive, send_secured)

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html)

    def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return PlainTextResponse("not found", status_code=404)
        return Response(assets[name], media_type=ASSETS[name])

    def api_state(request: Request) -> Response:
        try:
            return Response(station.state_json(), media_type="application/json")
        except Unreadable as exc:
            return PlainTextResponse(str(exc), status_code=503)

    def api_frame(request: Request) -> Response:
        try:
            frame_id = int(request.path_params["frame_id"])
        except ValueError:
            return PlainTextResponse("bad id", status_code=400)
        try:
            row = station.frame(frame_id)
        except Unreadable as exc:
            return PlainTextResponse(str(exc), status_code=503)
        if row is None:
            return PlainTextResponse("no such frame", status_code=404)
        return JSONResponse(row)

    async def api_review(request: Request) -> Response:
        """A review: JSON {frame_id, verdict: good|defect, note}, the review token in X-Review-Token (a header a
        page of another site cannot send without the station's consent, so no cross-site request forges one)."""
        if not reviewers:
            return _refuse(403, "reviews are off: start the station with --review-token NAME=SECRET")
        who = _reviewer(request.headers.get("x-review-token", ""), reviewers)
        if who is None:
            return _refuse(403, "review token required (X-Review-Token)")
        try:
            body = await request.json()
            frame_id, verdict, note = body["frame_id"], body["verdict"], body.get("note")
            if type(frame_id) is not int or verdict not in VERDICTS or not (note is None or isinstance(note, str)):
                raise ValueError(verdict)
        except (ValueError, TypeError, KeyError, AttributeError):
            return _refuse(400, f"a review is JSON {{frame_id, verdict: {' or '.join(VERDICTS)}, note}}")
        try:
            # in a worker thread: a busy database must not stall the page's other requests
            review = await run_in_threadpool(station.review, frame_id, verdict, who, note) \
                if 0 < frame_id < 2**63 else None
        except (Unreadable, DiffinspectError) as exc:
            return _refuse(503, str(exc))
        if review is None:
            return _refuse(404, f"no OK or NG frame {frame_id} (held and error frames have no verdict to review)")
        return JSONResponse(_finite(review))

    def files(request: Request) -> Response:
        path = station.resolve_file(request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        # sandbox: even a file a browser would run as a document gets no script and no origin
        return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()],
                            headers={"Content-Security-Policy": CSP + "; sandbox"})

    routes = [Route("/", page), Route("/static/{name}", asset), Route("/api/state", api_state),
              Route("/api/frame/{frame_id}", api_frame), Route("/api/review", api_review, methods=["POST"]),
              Route("/files/{path:path}", files)]
    return Starlette(routes=routes, middleware=[Middleware(Guard)])


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Content-Security-Policy": CSP}


def static_file(name: str) -> bytes:
    """A file of the page, read through importlib.resources (so an installed wheel serves it too)."""
    return resources.files("diffinspect.station").joinpath("static", name).read_bytes()


def _finite(value: Any) -> Any:  # noqa: ANN401
    """JSON for the page: a stored score of inf (or a NaN) becomes null, which the page shows as a dash."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _host_name(host: str) -> str:
    """The name in a Host header or a bind address, without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _refuse(status: int, why: str):  # noqa: ANN202 (Starlette)
    from starlette.responses import JSONResponse

    return JSONResponse({"error": " ".join(why.split())}, status_code=status)


def _reviewer(given: str, reviewers: dict[str, str]) -> str | None:
    """The name of the review token given, or None; every token is compared (in constant time)."""
    who = None
    for name, secret in reviewers.items():
        if hmac.compare_digest(given.encode(), secret.encode()):
            who = name
    return who


def parse_reviewers(specs: list[str], read_token: str | None = None) -> dict[str, str]:
    """--review-token NAME=SECRET (repeatable) as {name: secret}; one-line errors. A review secret is never the
    read token: whoever may only look must not be able to review."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, secret = spec.partition("=")
        name, secret = name.strip(), secret.strip()
        if not sep or not name:
            raise DiffinspectError("a review token is NAME=SECRET (the name is recorded with each review)")
        if len(secret) < 8:
            raise DiffinspectError(f"the review token of {name} must be at least 8 characters")
        if name in out:
            raise DiffinspectError(f"two review tokens are named {name}")
        if secret == read_token:
            raise DiffinspectError(f"the review token of {name} is the read-only token: give it its own secret")
        out[name] = secret
    if len(set(out.values())) < len(out):
        raise DiffinspectError("two review tokens share a secret: each reviewer needs their own")
    return out


def _authorized(request: Any, token: str) -> bool:  # noqa: ANN401
    given = request.query_params.get("token") or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def check_bind(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise DiffinspectError(f"the station on {host} is reachable from other machines: give it a token "
                               f"(--token, or DIFFINSPECT_STATION_TOKEN), or bind to 127.0.0.1")
    if token is not None and not token.strip():
        raise DiffinspectError("the station token is blank: give one of at least 8 characters, not only spaces")
    if token is not None and len(token) < 8:
        raise DiffinspectError("the station token must be at least 8 characters")


def station_url(host: str, port: int, token: str | None) -> str:
    """The page's address as printed for the user, the token percent-encoded."""
    name = f"[{host}]" if ":" in host else host
    query = "?" + urllib.parse.urlencode({"token": token}, quote_via=urllib.parse.quote) if token else ""
    return f"http://{name}:{port}/{query}"


def serve(out: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          shifts: str = DEFAULT_SHIFTS, server_names: tuple[str, ...] = (), reviewers: dict[str, str] | None = None,
          bound: dict[str, Any] | None = None) -> None:
    import uvicorn

    check_bind(host, token)
    app = create_app(out, token, shifts, host, server_names, reviewers, bound)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
