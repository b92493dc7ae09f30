"""File events and signals of `inspect watch`: the watchdog observer that tells the intake about new
files (kept alive across share re-mounts), and SIGINT/SIGTERM handling."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from diffinspect.line.intake import Intake
from diffinspect.line.say import WarnOnce, describe

log = logging.getLogger(__name__)


class Events:
    """The watchdog observer, restarted if its thread dies (e.g. a watched share unmounted). Without
    events (inotify watch limit reached) rescans alone still find every frame, only later."""

    def __init__(self, roots: list[Path], intake: Intake, recursive: bool, warn_once: WarnOnce) -> None:
        self.roots, self.intake, self.recursive, self.warn_once = roots, intake, recursive, warn_once
        self.observer = None

    def start(self) -> None:
        from watchdog.observers import Observer

        observer = Observer()
        try:
            handler = make_handler(self.intake)
            for root in self.roots:
                observer.schedule(handler, str(root), recursive=self.recursive)
            observer.start()
        except Exception as exc:
            self.warn_once(log, f"events:{type(exc).__name__}", f"file events unavailable "
                           f"({describe(exc)}); rescanning every second instead")
            self.intake.cfg.rescan_seconds = min(self.intake.cfg.rescan_seconds, 1.0)
            _stop_quietly(observer)
            return
        self.observer = observer

    def check(self) -> None:
        """Every few seconds: a watched folder deleted and re-created (a share re-mounted) ends its
        emitter thread; start the observer afresh (and rescan for what happened meanwhile)."""
        obs = self.observer
        if obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters)):
            return
        if obs is not None:
            log.warning("file events stopped; restarting them")
            _stop_quietly(obs)
            self.observer = None
        self.intake.rescan_soon()
        self.start()

    def stop(self) -> None:
        if self.observer is not None:
            _stop_quietly(self.observer)


def _stop_quietly(observer) -> None:  # noqa: ANN001
    # Stopping with events in flight makes watchdog log "queue_events() called when the thread is
    # inactive" at ERROR level: expected here, and alarming in a service log.
    log = logging.getLogger("watchdog.observers.inotify")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:  # noqa: S110 (it is being discarded either way)
        pass
    finally:
        log.setLevel(level)


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM: stop taking frames and commit the batch in flight. A second signal exits at
    once; that is safe too (rows are committed atomically, unscored frames are taken on restart)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    sigs = [signal.SIGINT, signal.SIGTERM]
    previous = {s: signal.getsignal(s) for s in sigs}

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    for s in sigs:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def make_handler(intake: Intake):  # noqa: ANN201 (watchdog is imported lazily)
    """A watchdog handler that only forwards paths; all decisions happen on the intake thread."""
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        def on_created(self, event) -> None:  # noqa: ANN001
            if event.is_directory:
                intake.rescan_soon()  # files may land in it before its watch is set up
            else:
                intake.notify(_text(event.src_path), vouched=False)

        def on_modified(self, event) -> None:  # noqa: ANN001
            if not event.is_directory:
                intake.notify(_text(event.src_path), vouched=False)

        def on_closed(self, event) -> None:  # noqa: ANN001  (IN_CLOSE_WRITE: the writer is done)
            intake.notify(_text(event.src_path), vouched=True)

        def on_moved(self, event) -> None:  # noqa: ANN001  (rename into the folder: atomic publish)
            if event.is_directory:
                intake.rescan_soon()
            else:
                intake.notify(_text(event.dest_path), vouched=True)

    return Handler()


def _text(p: str | bytes) -> str:
    return os.fsdecode(p)
