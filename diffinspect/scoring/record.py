"""The result of scoring one frame, errors included: what `inspect score` prints and what `inspect watch`
commits as a row of results.db / results.jsonl."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffinspect.logs import storable

# `inspect score --json` keys, in order: "label" is the status (the results.db column) under its
# user-facing name; "product" is set when the bundle was named by its product ([watch.products]).
SCORE_KEYS = ("path", "score", "threshold", "label", "p_value", "detector", "backend", "latency_ms", "overlay",
              "error", "product", "bundle_version")


@dataclass
class Record:
    path: str
    status: str  # ok | ng | error | hold: the verdict's label, named as results.db's column
    score: float | None
    threshold: float | None
    detector: str | None  # diffusion | copod
    backend: str | None
    latency_ms: float | None  # score: detector time per frame; watch: first seen -> row written
    overlay: str | None
    error: str | None
    # Where a watched frame came from and when; `inspect score` leaves them unset.
    folder: str | None = None  # the watched folder (camera)
    size: int | None = None
    mtime: float | None = None  # unix seconds
    mtime_ns: int | None = None  # exact, part of the frame's identity
    fallback_reason: str | None = None  # why the fallback scored it (None when diffusion did)
    received_at: float | None = None  # unix seconds, when the watcher first saw the file
    scored_at: float | None = None  # unix seconds, when the row was written
    health: str | None = None  # JSON of the frame's health signals (scoring/health.py), watch only
    id: int | None = None  # row id once committed
    # The verdict's conformal p-value (scoring/inspector.py): a plant may reject at its own alpha, p <= alpha.
    p_value: float | None = None
    # watch with on_alarm = "hold": the open alarms that made this frame's verdict hold (status "hold").
    hold_reason: str | None = None
    # watch with [watch.products]: the product on the line when the frame was taken (line/products.py).
    product: str | None = None
    bundle_version: int | None = None  # the version of the bundle that scored it (None for an error row)

    def to_dict(self) -> dict:
        """The `inspect score --json` line."""
        return {k: _text(getattr(self, "status" if k == "label" else k)) for k in SCORE_KEYS}


def _text(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN and infinities are not JSON: `--json` lines must parse everywhere
    return storable(value) if isinstance(value, str) else value
