"""`inspect watch`: score every frame the cameras drop, exactly once, without ever stopping the line.

    watchdog events ─┐                                                                 (events.py)
    periodic rescan ─┴→ Intake (one thread: completeness checks, oldest first)         (intake.py)
                          → FrameQueue (bounded: paths only) → per lane: prep (read + decode)
                          → score (diffusion, or the COPOD fallback)          (lane.py, supervisor.py)
                          → commit (overlay, SQLite + JSONL, hooks, then keep/move/delete)
                                                                   (commit.py, results.py, disposal.py)
    retention thread: old rows to OUT/archive/, our files within the disk budget, the free-space floor
                                                                                  (retention.py)

A lane is a group of folders sharing one detector pair (one per camera bundle); with several products
(line/products.py) each frame's product picks the bundle that scores it. This module only wires the parts
together and runs until stopped.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffinspect import DiffinspectError
from diffinspect.line.commit import CommitHook, Committer, OverlayWriter
from diffinspect.line.console import View
from diffinspect.line.counters import Stats, WatchSummary
from diffinspect.line.disposal import Disposal
from diffinspect.line.drift import DriftHub
from diffinspect.line.events import Events, install_signal_handlers
from diffinspect.line.intake import Intake, IntakeConfig
from diffinspect.line.lane import FrameQueue, Lane, LaneShared
from diffinspect.line.options import WatchOptions
from diffinspect.line.products import Products, ProductSetup
from diffinspect.line.retention import Retention, Space
from diffinspect.line.say import WarnOnce, print_rows
from diffinspect.line.supervisor import DetectorFactory, Supervisor, VersionHook
from diffinspect.outputs.outbox import Outbox, Output, mark_key
from diffinspect.scoring.overlay import save_overlay
from diffinspect.scoring.stages import StageClock
from diffinspect.store.results import ResultStore

__all__ = ["CommitHook", "DetectorFactory", "OverlayWriter", "ProductSetup", "WatchOptions", "WatchSummary",
           "run_watch"]

log = logging.getLogger(__name__)
Pair = tuple[DetectorFactory, DetectorFactory]
DetectorPairs = Mapping[Path, Pair]


def run_watch(folders: Sequence[Path], out: Path, make_detector: DetectorFactory | None,
              make_fallback: DetectorFactory | None, options: WatchOptions | None = None, *,
              per_folder: DetectorPairs | None = None, overlay_writer: OverlayWriter | None = None,
              on_commit: Sequence[CommitHook] = (), outputs: Sequence[Output] = (),
              products: ProductSetup | None = None) -> WatchSummary:
    """Watch folders (one per camera) and commit one row per frame to OUT/results.db (+ .jsonl).

    per_folder gives a folder its own (make_detector, make_fallback), e.g. from a TOML config.
    overlay_writer defaults to diffinspect.scoring.overlay.save_overlay. on_commit: called from the lanes'
    threads with each batch of newly committed rows (Records with ids), before their files are moved.
    outputs (MQTT, OPC UA) get every committed row through the outbox (outbox.py); scoring never waits for them.
    products: several products on the station (line/products.py); sub-folders are then watched too. Without
    them a folder needs a detector pair: (make_detector, make_fallback), or its own in per_folder.
    Returns after SIGINT/SIGTERM (the batch in flight is committed), options.stop, or with
    options.once when the backlog is done. Raises DiffinspectError for unusable arguments only."""
    opts = options or WatchOptions()
    opts.validate()
    roots = _check_folders(folders)
    per_folder = {Path(os.path.abspath(k)): v for k, v in (per_folder or {}).items()}
    unknown = [str(k) for k in per_folder if k not in roots]
    if unknown:
        raise DiffinspectError(f"per-folder detectors given for folders not watched: {', '.join(unknown)}")
    default = (make_detector, make_fallback) if make_detector is not None and make_fallback is not None else None
    if products is None and default is None and any(root not in per_folder for root in roots):
        raise DiffinspectError("no detector for some folders: give a bundle, or several products")
    out = Path(os.path.abspath(out))
    started = time.monotonic()
    warn_once = WarnOnce()
    store = ResultStore(out, log.warning)
    outbox = Outbox(store.db_path, outputs, log.warning, log.info).start() if outputs else None
    wake = [lambda rows: outbox.wake()] if outbox is not None else []
    space = Space(out, opts.retention.min_free_gb, store, warn_once)
    retention = Retention(store, out, opts.retention, [mark_key(o.name, "frames") for o in outputs], space,
                          warn_once)
    try:
        groups = _group_folders(roots, default, per_folder)
        summary = _run(roots, out, store, warn_once, groups, overlay_writer, [*wake, *on_commit], opts, started,
                       retention.start(), products)
        summary.archived, summary.low_space = retention.archived, space.low
        return summary
    finally:
        retention.stop()
        if outbox is not None:
            outbox.stop()  # after the last commit: a few seconds to deliver it while the receiver is up
        store.close()


def _run(roots: list[Path], out: Path, store: ResultStore, warn_once: WarnOnce,
         groups: list[tuple[list[Path], Pair | None]],
         overlay_writer: OverlayWriter | None, hooks: list[CommitHook], opts: WatchOptions,
         started: float, retention: Retention, setup: ProductSetup | None) -> WatchSummary:
    if store.reconciled:
        log.info(f"results.jsonl: {store.reconciled} row(s) restored from results.db")
    if opts.overlays != "none" and overlay_writer is None:
        overlay_writer = save_overlay
    (out / "overlays").mkdir(exist_ok=True)
    disposal = Disposal(opts.after, out, retention.space.room, retention.wrote)
    queues = [FrameQueue(opts.queue_size) for _ in groups]
    recursive = opts.recursive or setup is not None  # camera_feed/<product>/frame.png
    intake = Intake(roots, out, IntakeConfig(opts.pattern, recursive, opts.stable_ms, opts.empty_ms,
                                             opts.settle_ms, opts.rescan_seconds, opts.once),
                    store, {root: q for (folders, _), q in zip(groups, queues, strict=True) for root in folders},
                    functools.partial(disposal, what="committed frame "))
    stats, stop_taking, clock = Stats(), threading.Event(), StageClock()
    committer = Committer(store, out, opts.overlays, overlay_writer, disposal, intake.done, warn_once, stop_taking,
                          room=retention.space.room, wrote=retention.wrote, once=opts.once, clock=clock,
                          overlay_format=opts.overlay_format)
    drift = DriftHub(out, store, opts.alarm_lambda)
    committer.on_commit += [stats.record, *([print_rows] if opts.quiet else []), drift.on_commit, *hooks]
    if opts.on_alarm == "hold":
        committer.held = drift.held
    products = None
    if setup is not None:
        products = Products(setup, {f for folders, pair in groups if pair is not None for f in folders}, opts,
                            warn_once)
    shared = LaneShared(opts, committer, intake.recheck, stats.started, stop_taking, drift=drift,
                        products=products, clock=clock)
    lanes = [Lane(folders, q, None if pair is None else
                  Supervisor(*pair, opts, warn_once, _version_event(store, folders)), shared)
             for (folders, pair), q in zip(groups, queues, strict=True)]
    view = None if opts.quiet else View(stats, lanes, roots, opts.queue_size, intake.waiting)
    _serve(lanes, intake, Events(roots, intake, recursive, warn_once), shared, view)
    summary = stats.summary(max(q.high_water for q in queues), time.monotonic() - started)
    summary.uncommitted, summary.stages = committer.uncommitted, clock.ms_per_frame()
    return summary


def _version_event(store: ResultStore, folders: list[Path]) -> VersionHook:
    """A lane's swap to another bundle version as a station event (and so an MQTT event message)."""
    def record(what: str, detail: str) -> None:
        try:
            store.add_events([(time.time(), "version", what, "raised", detail, ", ".join(map(str, folders)))])
        except Exception as exc:  # the swap happened whatever the event table says
            log.warning(f"could not record the version change: {exc}")
    return record


def _serve(lanes: list[Lane], intake: Intake, events: Events, shared: LaneShared, view: View | None) -> None:
    """Start everything, wait for the end, then stop in order: the batches in flight are committed."""
    opts = shared.opts
    stop = threading.Event()
    restore_signals = install_signal_handlers(stop)
    intake_thread = threading.Thread(target=intake.run, name="watch-intake", daemon=True)
    try:
        for lane in lanes:
            if lane.supervisor is not None:
                lane.supervisor.start()
        if shared.products is not None:
            shared.products.start()  # every product's bundle, and the product on the line now
        if not opts.once:
            events.start()  # before the scan, so no file falls between the two
        intake.scan()  # the backlog, oldest first
        intake_thread.start()
        for lane in lanes:
            lane.start()
        _wait(stop, opts, intake, events, view)
    finally:
        shared.stop_taking.set()  # prep stops taking frames; batches in flight are scored and committed
        intake.halt()
        events.stop()
        for lane in lanes:
            lane.join(timeout=(opts.score_timeout_s or 60.0) + 30.0)
        if intake_thread.is_alive():
            intake_thread.join(timeout=5)
        shared.close()
        if shared.products is not None:
            shared.products.stop()
        restore_signals()


def _wait(stop: threading.Event, opts: WatchOptions, intake: Intake, events: Events, view: View | None) -> None:
    def done() -> bool:
        return (stop.is_set() or (opts.stop is not None and opts.stop.is_set())
                or (opts.once and intake.finished.is_set()))

    next_check = time.monotonic() + 5
    live = None
    if view is not None:
        from rich.live import Live

        from diffinspect.logs import console

        # on the console the records show on, so warnings print above the table
        live = Live(view.table(), console=console(), refresh_per_second=2, transient=False)
        live.start()
    try:
        while not done():
            stop.wait(0.05 if live is None else 0.25)
            if not opts.once and time.monotonic() >= next_check:
                events.check()
                next_check = time.monotonic() + 5
            if live is not None:
                live.update(view.table())
    finally:
        if live is not None:
            live.update(view.table())
            live.stop()


def _group_folders(roots: list[Path], default: Pair | None,
                   per_folder: DetectorPairs) -> list[tuple[list[Path], Pair | None]]:
    """One lane per distinct detector pair (None: the products' bundles only), with the folders that use it."""
    groups: dict[tuple[int, int] | None, tuple[list[Path], Pair | None]] = {}
    for root in roots:
        pair = per_folder.get(root, default)
        key = None if pair is None else (id(pair[0]), id(pair[1]))
        groups.setdefault(key, ([], pair))[0].append(root)
    return list(groups.values())


def _check_folders(folders: Sequence[Path]) -> list[Path]:
    if not folders:
        raise DiffinspectError("no folder to watch")
    roots: list[Path] = []
    for f in folders:
        root = Path(os.path.abspath(f))
        if not root.is_dir():
            raise DiffinspectError(f"folder to watch not found: {f}")
        if root not in roots:
            roots.append(root)
    return roots
