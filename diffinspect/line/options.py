"""The settings of one `inspect watch` run, checked before anything starts."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from diffinspect import DiffinspectError
from diffinspect.config import ALARM_LAMBDA, RetentionSettings, check_alarm_lambda
from diffinspect.vocab import After, OverlayFormat, Overlays

ON_ALARM = ("flag", "hold")


@dataclass
class WatchOptions:
    batch: int = 8
    overlays: str = "ng"  # ng | all | none
    overlay_format: str = "png"  # png | jpg: JPEG costs far less to encode, PNG is lossless
    after: str = "keep"  # keep | move | delete (only after the frame's row is committed)
    recursive: bool = False
    pattern: str | None = None  # glob on the file name (case-insensitive); None: image suffixes
    once: bool = False  # score the backlog, then return
    quiet: bool = False  # plain log lines (service mode) instead of the live view
    max_latency_ms: float | None = None  # frames that would miss it are scored by the fallback
    max_megapixels: float | None = 50.0
    stable_ms: float = 300.0  # size + mtime unchanged this long = complete (without a close event)
    empty_ms: float = 5000.0  # a zero-byte file this old gets an error row
    settle_ms: float = 2000.0  # a PNG/JPEG/BMP without its end marker is re-read after this quiet
    retry_seconds: float = 60.0  # re-create a failed diffusion detector (and a failed fallback)
    queue_size: int = 256  # bounded scoring queue (file names) per lane
    batch_wait_ms: float = 3.0  # how long a partial batch waits for more frames
    rescan_seconds: float = 5.0  # safety net for missed file events
    score_timeout_s: float | None = 120.0  # a diffusion call hung this long counts as failed
    decode_workers: int = 2
    # While a lighting, focus or camera-moved alarm is open for a camera: "flag" raises it and keeps the
    # verdicts; "hold" makes every scored verdict of that camera `hold` (the part goes to manual check).
    on_alarm: str = "flag"
    alarm_lambda: float = ALARM_LAMBDA  # drift alarms: P(any false alarm, ever) <= 1 / alarm_lambda
    retention: RetentionSettings = field(default_factory=RetentionSettings)  # [watch.retention]
    stop: threading.Event | None = None  # set it to stop (tests, embedding)

    def validate(self) -> None:
        checks = [
            (self.batch >= 1, f"batch must be at least 1, got {self.batch}"),
            (self.overlays in Overlays.values(),
             f"overlays must be ng, all or none, got {self.overlays!r}"),
            (self.overlay_format in OverlayFormat.values(),
             f"overlay_format must be png or jpg, got {self.overlay_format!r}"),
            (self.after in After.values(),
             f"after must be keep, move or delete, got {self.after!r}"),
            (self.queue_size >= self.batch, f"queue size ({self.queue_size}) must be at least the batch "
                                            f"({self.batch})"),
            (self.max_latency_ms is None or 0 < self.max_latency_ms < math.inf, "max latency must be a positive "
                                                                               "number of milliseconds"),
            (self.max_megapixels is None or 0 < self.max_megapixels < math.inf,
             "max megapixels must be a positive number"),
            (min(self.stable_ms, self.empty_ms, self.settle_ms, self.batch_wait_ms) >= 0,
             "waiting times cannot be negative"),
            (self.retry_seconds > 0 and self.rescan_seconds > 0, "retry and rescan periods must be positive"),
            (self.decode_workers >= 1, "decode workers must be at least 1"),
            (self.on_alarm in ON_ALARM, f"on_alarm must be flag or hold, got {self.on_alarm!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DiffinspectError(message)
        check_alarm_lambda(self.alarm_lambda)
        self.retention.validate(prefix="retention.")
