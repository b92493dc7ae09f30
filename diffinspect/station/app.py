"""`inspect station OUT`: one live web page over OUT/results.db for the people at the line.

It reads results.db through the store's read-only queries (store/reader.py), so the page can neither
slow nor break scoring. It binds to 127.0.0.1 by default; on any other address it refuses to start
without a token, and with a token every request must carry it (`?token=`, or `Authorization: Bearer`).
Files are served from OUT only: a requested path is resolved (symlinks followed) and must stay inside OUT.

The page is plain HTML, JS and SVG (no CDN: plant networks are offline), shipped as the package files
static/index.html, app.js and style.css, and polls /api/state. The two assets hold no results and are the
same on every install, so they are served without the token (a browser does not pass `?token=` on to them).
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import math
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

from diffinspect import DiffinspectError
from diffinspect.store import BANDS_FILE, NotReady
from diffinspect.store.reader import ResultsReader

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SIGNAL_NAMES = ("brightness", "contrast", "sharpness", "shift")
DEFAULT_SHIFTS = "06:00,14:00,22:00"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
RECENT_ROWS = 100_000  # rejects are looked for among this many latest rows


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

    def __init__(self, out: Path, shifts: str = DEFAULT_SHIFTS) -> None:
        self.out = Path(out).resolve()
        if not self.out.is_dir():
            raise DiffinspectError(f"results folder not found: {out}")
        self.db_path = self.out / "results.db"
        self.shifts = parse_shifts(shifts)

    def state(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        db = ResultsReader.open(self.db_path)
        base: dict[str, Any] = {"out": str(self.out), "now": now, "ready": db is not None}
        if db is None:
            return base
        try:
            with db:
                return {**base, **self._state(db, now)}
        except NotReady as exc:  # no table yet (a watcher just starting), or busy
            return {**base, "ready": False, "error": str(exc)}

    def _state(self, db: ResultsReader, now: float) -> dict[str, Any]:
        hour, shift = now - 3600, shift_start(now, self.shifts)
        max_id = db.max_id()
        recent_id = max(0, max_id - RECENT_ROWS)
        counts = {}
        for key, since in (("hour", hour), ("shift", shift)):
            c = db.status_counts(since)
            span_min = max((now - since) / 60.0, 1e-9)
            counts[key] = {"total": c["n"], "ok": c["ok"], "ng": c["ng"], "error": c["error"], "hold": c["hold"],
                           "per_minute": c["n"] / span_min, "since": since}
        # OK/NG/error per minute over the last hour.
        trend = [{"t": hour + 60 * i, "ok": 0, "ng": 0, "error": 0, "hold": 0} for i in range(60)]
        for r in db.per_minute(hour):
            if 0 <= r["b"] <= 60:  # 60: scored this very second
                trend[min(r["b"], 59)][r["status"]] += r["n"]
        lat = sorted(v for v in db.latencies(last=2000) if v is not None)
        last = db.last_scored(after=recent_id)
        scored, fallback = db.fallback_count(after=recent_id, last=200)
        rejects = [self._frame(r) for r in db.rejects(after=recent_id, last=12)]
        health = []
        for r in db.health(after=recent_id, last=300):
            values = _json(r["health"])
            if isinstance(values, dict):
                health.append({"id": r["id"], "t": r["scored_at"], "folder": r["folder"],
                               **{k: _num(values.get(k)) for k in SIGNAL_NAMES}})
        health.reverse()
        return {
            "counts": counts, "trend": trend, "max_id": max_id,
            "latency": {"p50": _pct(lat, 50), "p99": _pct(lat, 99), "n": len(lat)},
            "detector": None if last is None else {
                "detector": last["detector"], "backend": last["backend"], "fallback_reason": last["fallback_reason"],
                "fallback_share": fallback / scored if scored else 0.0,
                "threshold": last["threshold"], "at": last["scored_at"]},
            "histogram": _histogram(db.scores(after=recent_id, last=2000), last["detector"] if last else None),
            "rejects": rejects, "health": health, "bands": self._bands(), **_alarms(db),
            # Cameras whose verdicts are held now (on_alarm = "hold"): why, and since which frame.
            "hold": db.held(after=recent_id),
        }

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        db = ResultsReader.open(self.db_path)
        if db is None:
            return None
        with db:
            row = db.frame(frame_id)
        return None if row is None else self._frame(row)

    def _frame(self, d: dict[str, Any]) -> dict[str, Any]:
        d["name"] = Path(d["path"]).name
        d["overlay_url"] = self._file_url(d.get("overlay"))
        d["overlay"] = None
        d["health"] = _json(d.get("health")) if d.get("health") else None
        return d

    def _bands(self) -> dict[str, Any]:
        path = self.out / BANDS_FILE
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}
        bands = data.get("bands") if isinstance(data, dict) else None
        return bands if isinstance(bands, dict) else {}

    # -- files inside OUT ------------------------------------------------------------------------

    def _file_url(self, path: str | None) -> str | None:
        if not path:
            return None
        try:
            rel = Path(path).resolve().relative_to(self.out)
        except (ValueError, OSError):
            return None
        return "/files/" + rel.as_posix()

    def resolve_file(self, rel: str) -> Path | None:
        """The file OUT/rel, or None when rel leaves OUT (.., absolute, a symlink out) or is no file."""
        if not rel or "\x00" in rel or os.path.isabs(rel):
            return None
        try:
            path = (self.out / rel).resolve(strict=True)
            path.relative_to(self.out)
        except (ValueError, OSError, RuntimeError):
            return None
        if not path.is_file() or path.name in ("results.db", "results.db-wal", "results.db-shm", ".watch.lock"):
            return None
        return path


def _alarms(db: ResultsReader) -> dict[str, Any]:
    """The drift alarms raised now (the latest event per kind and camera says raised), and the last 50 events."""
    latest: dict[tuple, dict] = {}
    for e in db.events():
        latest[(e["kind"], e["folder"])] = e
    return {"alarms": [e for e in latest.values() if e["state"] == "raised"], "events": db.events(last=50)}


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


def _histogram(rows: list, detector: str | None, bins: int = 30) -> dict[str, Any]:
    """Scores of the current detector (the fallback's scores are on another scale)."""
    rows = [r for r in rows if r["detector"] == detector and r["score"] is not None and math.isfinite(r["score"])]
    if not rows:
        return {"edges": [], "counts": [], "threshold": None, "detector": detector}
    scores = [r["score"] for r in rows]
    thr = rows[0]["threshold"]
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


def create_app(out: Path, token: str | None = None, shifts: str = DEFAULT_SHIFTS):  # noqa: ANN201 (Starlette)
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    station = Station(out, shifts)
    page_html = static_file("index.html").decode()
    assets = {name: static_file(name) for name in ASSETS}
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                                          " img-src 'self'; connect-src 'self'; frame-ancestors 'none'"}

    class TokenGate:
        def __init__(self, app) -> None:  # noqa: ANN001
            self.app = app

        async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
            request = Request(scope) if scope["type"] == "http" else None
            if (request is not None and token is not None and not request.url.path.startswith("/static/")
                    and not _authorized(request, token)):
                await PlainTextResponse("token required", status_code=401)(scope, receive, send)
                return
            await self.app(scope, receive, send)

    async def page(request: Request) -> Response:
        return HTMLResponse(page_html, headers=headers)

    def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return PlainTextResponse("not found", status_code=404)
        return Response(assets[name], media_type=ASSETS[name], headers=headers)

    def api_state(request: Request) -> Response:
        return JSONResponse(station.state(), headers=headers)

    def api_frame(request: Request) -> Response:
        try:
            frame_id = int(request.path_params["frame_id"])
        except ValueError:
            return PlainTextResponse("bad id", status_code=400)
        row = station.frame(frame_id)
        if row is None:
            return PlainTextResponse("no such frame", status_code=404)
        return JSONResponse(row, headers=headers)

    def files(request: Request) -> Response:
        path = station.resolve_file(request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers=headers)

    routes = [Route("/", page), Route("/static/{name}", asset), Route("/api/state", api_state),
              Route("/api/frame/{frame_id}", api_frame),
              Route("/files/{path:path}", files)]
    return Starlette(routes=routes, middleware=[Middleware(TokenGate)])


def static_file(name: str) -> bytes:
    """A file of the page, read through importlib.resources (so an installed wheel serves it too)."""
    return resources.files("diffinspect.station").joinpath("static", name).read_bytes()


def _authorized(request: Any, token: str) -> bool:
    given = request.query_params.get("token") or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def check_bind(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise DiffinspectError(f"the station on {host} is reachable from other machines: give it a token "
                               f"(--token, or DIFFINSPECT_STATION_TOKEN), or bind to 127.0.0.1")
    if token is not None and len(token) < 8:
        raise DiffinspectError("the station token must be at least 8 characters")


def serve(out: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          shifts: str = DEFAULT_SHIFTS) -> None:
    import uvicorn

    check_bind(host, token)
    app = create_app(out, token, shifts)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)

