"""Detector supervision of `inspect watch`: a lane keeps its diffusion detector when it can and its
fallback always; a failing or hung backend costs a warning and a re-creation attempt, never a frame.

Hang isolation: Python cannot kill a thread, so a backend's calls run on a thread of their own
(`Caller`) and the lane stops waiting for a call that hangs past score_timeout_s.

Versions: between batches the lane looks at its bundle's active-version pointer (bundle.ActivePointer);
a newly activated version is loaded whole in the background while the current one keeps scoring, then
swapped in before the next batch. A batch is scored by one detector, so each row names the version
that scored it. A version that fails to load leaves the current one, said once.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from diffinspect.bundle import ActivePointer
from diffinspect.data.image import convert_color
from diffinspect.line.frame import Item
from diffinspect.line.options import WatchOptions
from diffinspect.line.say import WarnOnce, describe
from diffinspect.scoring.detector import Detector
from diffinspect.scoring.features import FEATURE_SIZE
from diffinspect.scoring.inspector import Inspector, Verdict
from diffinspect.scoring.stages import PREPROCESS, StageClock

log = logging.getLogger(__name__)

# Makes the lane's diffusion inspector or its fallback (a bare Detector is wrapped in an Inspector).
DetectorFactory = Callable[[], Inspector | Detector]
# Told when a lane swapped in another bundle version: (what happened, details).
VersionHook = Callable[[str, str], None]


class Caller:
    """Runs a backend's calls on its own daemon thread so a hung call can be abandoned: Python cannot
    kill a thread, but the line can stop waiting for it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="watch-diffusion", daemon=True).start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, box, done = job
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # handed to the caller, like a future
                box["error"] = exc
            done.set()

    def call(self, fn: Callable, args: tuple, timeout: float | None):  # noqa: ANN201
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, args, box, done))
        if not done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        self._jobs.put(None)


class Supervisor:
    """Keeps a diffusion detector when it can and the fallback always: a failing or hung backend
    costs a warning and a re-creation attempt after retry_seconds, never a frame."""

    def __init__(self, make_primary: DetectorFactory, make_fallback: DetectorFactory, opts: WatchOptions,
                 warn_once: WarnOnce, on_version: VersionHook | None = None) -> None:
        self._make_primary, self._make_fallback = make_primary, make_fallback
        self._opts, self._warn_once, self._on_version = opts, warn_once, on_version
        self._lock = threading.Lock()
        self.primary: Inspector | None = None
        self._caller: Caller | None = None
        self.down = "not loaded yet"
        self._retry_at = 0.0
        self._loading = False
        self.fallback: Inspector | None = None
        self._fb_down = "not loaded yet"
        self._fb_retry_at = 0.0
        self._est_s = 0.0  # recent diffusion time per batch, for max-latency routing
        self._pointer: ActivePointer | None = None
        self._next_version: tuple[Inspector, Inspector] | None = None  # loaded, swapped in before the next batch
        self._version_loading = False
        self._refused: int | None = None  # the version that failed to load (said once)

    def start(self) -> None:
        """Load both detectors. A diffusion load that hangs (a wedged accelerator) is left to finish
        in the background after score_timeout_s while the fallback scores frames."""
        self._fallback_now()
        self._loading, self.down = True, "diffusion detector still loading"
        loader = threading.Thread(target=self._load_primary, name="watch-load", daemon=True)
        loader.start()
        loader.join(self._opts.score_timeout_s)
        if loader.is_alive():
            log.warning(f"diffusion detector not loaded after {self._opts.score_timeout_s:g} s; "
                        f"the fallback scores frames until it is")

    @property
    def health(self):  # noqa: ANN201 (HealthProfile | None: what drift alarms compare frames to)
        insp = self.primary or self.fallback
        return None if insp is None else insp.health

    @property
    def decode_side(self) -> int | None:
        """The min_side frames are decoded at (data/image.py): the scale scoring needs, the rule of
        Preprocess.read_side (None, whole, for tiles and an ROI). With drift alarms, only where the health
        profile was fitted at that scale: a profile without one (older bundles) was fitted on whole frames,
        whose focus signal reads native detail that a reduced frame averages away, so frames stay whole."""
        insp = self.primary or self.fallback
        if insp is None:
            return None
        embed = getattr(getattr(self.fallback, "detector", None), "feature_size", FEATURE_SIZE)
        side = insp.preprocess.read_side(embed)
        return None if insp.health is not None and insp.health.read_side != side else side

    @property
    def color(self) -> str:
        det = self.primary or self.fallback
        return det.preprocess.color if det is not None else "rgb"

    def state(self) -> str:
        if self.primary is not None:
            version = f", version {self.primary.version}" if self.primary.version is not None else ""
            return f"{self.primary.name} ({self.primary.backend}{version})"
        wait = max(0.0, self._retry_at - time.monotonic())
        retry = "loading" if self._loading else f"retry in {wait:.0f} s"
        return f"FALLBACK ({self.down}; {retry})"

    def _load_primary(self) -> None:
        try:
            det = as_inspector(self._make_primary())
        except Exception as exc:
            with self._lock:
                self.down = f"diffusion detector unavailable: {describe(exc)}"
                self._retry_at = time.monotonic() + self._opts.retry_seconds
                self._loading = False
            log.warning(f"{self.down}; the fallback scores frames, "
                        f"retry in {self._opts.retry_seconds:g} s")
            return
        with self._lock:
            self.primary, self._loading = det, False
            self._caller = Caller() if self._opts.score_timeout_s else None
        log.info(f"{det.name} detector ready ({det.backend})")

    def _primary_now(self) -> tuple[Inspector | None, Caller | None]:
        with self._lock:
            if self.primary is None and not self._loading and time.monotonic() >= self._retry_at:
                self._loading = True  # load in the background: the fallback keeps the line going
                threading.Thread(target=self._load_primary, name="watch-reload", daemon=True).start()
            return self.primary, self._caller

    def _fail_primary(self, det: Inspector, reason: str) -> None:
        with self._lock:
            if self.primary is not det:
                return
            if self._caller is not None:
                self._caller.close()
            self.primary, self._caller, self.down = None, None, reason
            self._retry_at = time.monotonic() + self._opts.retry_seconds
        log.warning(f"{reason}; the fallback scores frames, re-creating the detector in "
                    f"{self._opts.retry_seconds:g} s")

    def _fallback_now(self) -> Inspector | None:
        if self.fallback is None and time.monotonic() >= self._fb_retry_at:
            try:
                self.fallback = as_inspector(self._make_fallback())
            except Exception as exc:
                self._fb_down = describe(exc)
                self._fb_retry_at = time.monotonic() + self._opts.retry_seconds
                log.warning(f"fallback detector unavailable: {self._fb_down}")
        return self.fallback

    def score(self, items: list[Item], clock: StageClock | None = None) -> None:
        """Give decoded items their verdict and inspector (or an error); clock: time by stage."""
        clock = clock or StageClock()
        self._follow_version()
        primary, caller = self._primary_now()
        to_primary, to_fallback = self._route(items, primary)
        if primary is not None and to_primary:
            to_fallback += self._score_primary(primary, caller, to_primary, clock)
        if to_fallback:
            self._score_fallback(to_fallback, clock)

    def _route(self, items: list[Item], primary: Inspector | None) -> tuple[list[Item], list[Item]]:
        """(for diffusion, for the fallback): all to the fallback while diffusion is down, and the frames
        diffusion would finish past max_latency_ms."""
        fallback = self._fallback_now()
        now = time.time()
        limit = self._opts.max_latency_ms
        to_primary: list[Item] = []
        to_fallback: list[Item] = []
        for it in items:
            if primary is None:
                it.fallback_reason = self.down
                to_fallback.append(it)
            elif (limit is not None and fallback is not None
                  and now + self._est_s > it.cand.received_at + limit / 1000):
                it.fallback_reason = f"latency: diffusion would miss the {limit:g} ms deadline"
                to_fallback.append(it)
            else:
                to_primary.append(it)
        return to_primary, to_fallback

    def _score_primary(self, primary: Inspector, caller: Caller | None, items: list[Item],
                       clock: StageClock) -> list[Item]:
        """Score with diffusion; returns the items the fallback has to score instead."""
        t0 = time.monotonic()
        try:
            with clock.timed(PREPROCESS):
                frames = [convert_color(it.frame, primary.preprocess.color) for it in items]
            shapes = [it.shape for it in items]
            if caller is not None:
                verdicts = _checked(caller.call(primary.inspect, (frames, clock, shapes), self._opts.score_timeout_s))
            else:
                verdicts = _checked(primary.inspect(frames, clock, shapes))
        except Exception as exc:
            reason = f"diffusion detector failed: {describe(exc)}"
            self._fail_primary(primary, reason)
            for it in items:
                it.fallback_reason = reason
            return items
        self._est_s = 0.8 * self._est_s + 0.2 * (time.monotonic() - t0)
        left: list[Item] = []
        for it, v in zip(items, verdicts, strict=True):
            if v.label == "error" and not math.isfinite(v.score):
                it.fallback_reason = "diffusion score not finite"
                left.append(it)
            else:  # a verdict, or an error verdict that says why (a threshold that is not a number)
                it.verdict, it.by = v, primary
        return left

    def _score_fallback(self, items: list[Item], clock: StageClock) -> None:
        insp = self._fallback_now()
        if insp is None:
            for it in items:
                it.error = f"no detector could score it ({it.fallback_reason}; fallback: {self._fb_down})"
            return
        with clock.timed(PREPROCESS):
            frames = [convert_color(it.frame, insp.preprocess.color) for it in items]
        try:
            results: list[Verdict | str] = list(_checked(insp.inspect(frames, clock, [it.shape for it in items])))
        except Exception as exc:
            self._warn_once(log, f"fallback:{type(exc).__name__}", f"fallback failed on a batch "
                            f"({describe(exc)}); scoring its frames one by one")
            results = [self._one(insp, f) for f in frames]
            if all(isinstance(r, str) for r in results):  # the instance is broken: replace it
                self.fallback, self._fb_down = None, str(results[0])
                self._fb_retry_at = time.monotonic() + self._opts.retry_seconds
        for it, r in zip(items, results, strict=True):
            if isinstance(r, str):
                it.error = f"scoring failed ({it.fallback_reason}; fallback: {r})"
            elif r.label == "error" and not math.isfinite(r.score):
                it.error = f"scoring failed ({it.fallback_reason}; fallback: score not finite)"
            else:
                it.verdict, it.by = r, insp

    # -- versions ------------------------------------------------------------------------------

    def _follow_version(self) -> None:
        """Swap in a version loaded since the last batch; start loading a newly activated one."""
        with self._lock:
            ready, self._next_version = self._next_version, None
        if ready is not None:
            self._swap(*ready)
        current = self.fallback or self.primary
        if current is None or current.bundle is None or self._version_loading or self._loading:
            return
        if self._pointer is None or self._pointer.root != current.bundle:
            self._pointer = ActivePointer(current.bundle)
        active = self._pointer.active()
        if active is None or active == current.version or active == self._refused:
            return
        self._version_loading = True
        threading.Thread(target=self._load_version, args=(active, current.version), name="watch-version",
                         daemon=True).start()

    def _load_version(self, number: int, old: int | None) -> None:
        try:
            fallback = as_inspector(self._make_fallback())
            primary = as_inspector(self._make_primary())
        except Exception as exc:
            self._refused = number
            log.warning(f"bundle version {number} was activated but does not load ({describe(exc)}); "
                        f"version {old} keeps scoring")
        else:
            if {fallback.version, primary.version} == {number}:  # else activated again meanwhile: look again
                with self._lock:
                    self._next_version = (primary, fallback)
        self._version_loading = False

    def _swap(self, primary: Inspector, fallback: Inspector) -> None:
        with self._lock:
            old = self.fallback or self.primary
            if self._caller is not None:
                self._caller.close()
            self.primary, self.fallback, self._fb_down = primary, fallback, ""
            self._caller = Caller() if self._opts.score_timeout_s else None
            self._refused = None
        what = f"bundle version {primary.version} active"
        detail = (f"{primary.bundle}: version {primary.version} scores from this batch on "
                  f"(was {old.version if old else 'none'})")
        log.info(f"{what}: {detail}")
        if self._on_version is not None:
            self._on_version(what, detail)

    @staticmethod
    def _one(insp: Inspector, frame: np.ndarray) -> Verdict | str:
        """The frame's verdict, or why the fallback failed on it."""
        try:
            return _checked(insp.inspect([frame]))[0]
        except Exception as exc:
            return describe(exc)


class DetectorFailed(Exception):
    """The detector gave a batch no usable answer (a wrong number of scores)."""


def _checked(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts, or DetectorFailed when the detector gave a frame no score at all: the supervisor
    answers that as it answers a crash, by switching detector."""
    for v in verdicts:
        if v.score is None:
            raise DetectorFailed(v.error)
    return verdicts


def as_inspector(made: Inspector | Detector) -> Inspector:
    """What a factory made, as an Inspector (a bare detector is wrapped, without p-values)."""
    return made if isinstance(made, Inspector) else Inspector(made)
