"""Several products on one station: which product a frame shows, and which bundle scores it.

`[watch.products]` maps product names to bundles. A frame's product is chosen by the first of these that
names one:

1. the sub-folder the camera writes into: `camera_feed/<product>/frame.png` (on a camera with a bundle of
   its own, only a sub-folder named after a product);
2. the camera folder, where `[watch.cameras]` maps it to a product;
3. the retained MQTT command topic `diffinspect/{station}/product` (payload: the product's name);
4. the OPC UA node the PLC sets at a changeover.

The two line-wide signals (3, 4) keep their changeovers with the time each came into force, and a frame
takes the product in force when it was taken (its mtime, or when the watcher first saw it if that is
earlier): frames already in flight at a changeover are scored by the bundle of the product they show.
A product not in `[watch.products]` holds every verdict (status hold, "unknown product X") until the line
changes over to a known one; so does a frame no source names a product for, on a camera without a bundle.
Each product's bundle is loaded once, at start, and kept: a changeover costs no loading.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from diffinspect.line.frame import Candidate
from diffinspect.line.options import WatchOptions
from diffinspect.line.say import WarnOnce
from diffinspect.line.supervisor import DetectorFactory, Supervisor

log = logging.getLogger(__name__)

KEEP_S = 3600.0  # changeovers older than this are forgotten (the one in force is always kept)
READY_S = 10.0  # how long the start waits for the line-wide signals' current product

Report = Callable[[str | None, float], None]  # (product or None when the signal names none, since when)


class ProductSource(Protocol):
    """A line-wide product signal (outputs/mqtt.py ProductTopic, outputs/opcua.py ProductNode): it reports
    each product it reads with the time the product came into force (-inf: in force since before the start)."""

    name: str
    ready: threading.Event  # the current product is known (or the signal has none)

    def start(self, report: Report) -> None: ...

    def stop(self) -> None: ...


@dataclass
class ProductSetup:
    """What `inspect watch` is given for several products (cli.py builds it from inspect.toml)."""

    bundles: Mapping[str, tuple[DetectorFactory, DetectorFactory]]  # product -> (diffusion, fallback)
    folders: Mapping[Path, str] = field(default_factory=dict)  # camera folder -> product
    sources: Sequence[ProductSource] = ()  # line-wide signals, the first one wins


class Timeline:
    """One signal's changeovers: (time in force, product), oldest first; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._at: list[float] = []
        self._product: list[str | None] = []

    def set(self, product: str | None, at: float) -> bool:
        """Record a changeover; False when the product is the one in force already."""
        with self._lock:
            if self._product and self._product[-1] == product:
                return False
            at = max(at, self._at[-1]) if self._at else at  # a clock step back cannot reorder changeovers
            self._at.append(at)
            self._product.append(product)
            old = bisect.bisect_left(self._at, time.time() - KEEP_S) - 1
            if old > 0:
                del self._at[:old], self._product[:old]
            return True

    def at(self, t: float) -> str | None:
        """The product in force at time t."""
        with self._lock:
            i = bisect.bisect_right(self._at, t)
            return self._product[i - 1] if i else None

    def now(self) -> str | None:
        with self._lock:
            return self._product[-1] if self._product else None


@dataclass(eq=False)
class Bundle:
    """A detector pair in use: a lane's own or a product's. Lanes that share a product's take turns."""

    supervisor: Supervisor
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Route:
    """Where one frame goes: its product, and the bundle that scores it or why its verdict is held."""

    product: str | None
    bundle: Bundle | None
    held: str | None = None


class Products:
    """The product of each frame and its bundle, for every lane of one run."""

    def __init__(self, setup: ProductSetup, defaults: set[Path], opts: WatchOptions, warn_once: WarnOnce) -> None:
        """defaults: the camera folders with a bundle of their own (--model, or [watch.cameras]); their frames
        that no source names a product for are scored by it, those of the other cameras are held."""
        self.setup, self.defaults = setup, defaults
        self.bundles = {name: Bundle(Supervisor(*pair, opts, warn_once)) for name, pair in setup.bundles.items()}
        self.timelines = {s.name: Timeline() for s in setup.sources}

    def start(self) -> None:
        """Load every product's bundle, then read the signals' current product before any frame is routed."""
        for b in self.bundles.values():
            b.supervisor.start()
        for source in self.setup.sources:
            source.start(self._reporter(source.name))
        deadline = time.monotonic() + READY_S
        for source in self.setup.sources:
            if not source.ready.wait(max(0.0, deadline - time.monotonic())):
                log.warning(f"product signal {source.name}: no current product after {READY_S:g} s; "
                              f"frames take the product it names once it answers")

    def stop(self) -> None:
        for source in self.setup.sources:
            source.stop()

    def _reporter(self, source: str) -> Report:
        timeline = self.timelines[source]

        def report(product: str | None, at: float) -> None:
            old = timeline.now()
            if timeline.set(product, at):
                unknown = "" if product is None or product in self.bundles else " (unknown: verdicts held)"
                when = "before the start" if math.isinf(at) else time.strftime("%H:%M:%S", time.localtime(at))
                log.info(f"product {old or '-'} -> {product or '-'}{unknown} by {source}, in force from {when}")
        return report

    def route(self, cand: Candidate, own: Bundle | None) -> Route:
        """The frame's product and the bundle that scores it (own: its lane's bundle, if the camera has one)."""
        product = self.product_of(cand)
        if product is None:
            return Route(None, own) if own is not None else Route(None, None, "no product selected")
        bundle = self.bundles.get(product)
        return Route(product, bundle, None if bundle is not None else f"unknown product {product}")

    def product_of(self, cand: Candidate) -> str | None:
        parts = cand.path.parts[len(cand.folder.parts):] if cand.path.is_relative_to(cand.folder) else ()
        if len(parts) > 1 and (parts[0] in self.bundles or cand.folder not in self.defaults):
            return parts[0]
        product = self.setup.folders.get(cand.folder)
        if product is not None:
            return product
        taken = min(cand.mtime_ns / 1e9, cand.received_at)  # a camera clock ahead of ours cannot postdate it
        for source in self.setup.sources:
            product = self.timelines[source.name].at(taken)
            if product is not None:
                return product
        return None
