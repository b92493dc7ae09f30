"""The live table of `inspect watch` in interactive mode (its warnings print above it as log records)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffinspect.line.counters import Stats
from diffinspect.line.lane import Lane


class View:
    """The live table of the interactive mode."""

    def __init__(self, stats: Stats, lanes: list[Lane], roots: list[Path], queue_size: int,
                 waiting: Callable[[], int]) -> None:
        self.stats, self.lanes, self.roots = stats, lanes, roots
        self.queue_size, self.waiting = queue_size, waiting

    def table(self):  # noqa: ANN201
        from rich.table import Table

        s = self.stats
        p50, p99 = s.percentiles(last=2000)
        c = s.counts
        t = Table(title=f"inspect watch: {', '.join(r.name for r in self.roots)}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("frames", f"{sum(c.values())}")
        t.add_row("OK / NG / error", f"[green]{c['ok']}[/] / [red]{c['ng']}[/] / [yellow]{c['error']}[/]")
        if c["hold"]:
            t.add_row("held (alarm open)", f"[magenta]{c['hold']}[/]")
        t.add_row("frames/s, last 10 s / while scoring", f"{s.rate():.1f} / {s.busy_rate():.1f}")
        t.add_row("latency p50 / p99", "-" if p50 is None else f"{p50:.0f} / {p99:.0f} ms")
        t.add_row("scored by fallback", f"{s.fallback}")
        depth = sum(lane.queue.qsize() for lane in self.lanes)
        t.add_row("queue", f"{depth} / {self.queue_size * len(self.lanes)} (+{self.waiting()} waiting)")
        for lane in self.lanes:
            if lane.supervisor is not None:
                t.add_row(f"detector {', '.join(f.name for f in lane.folders)}", lane.supervisor.state())
        products = self.lanes[0].shared.products if self.lanes else None
        for name, bundle in ({} if products is None else products.bundles).items():
            counts = s.by_product.get(name, {})
            t.add_row(f"product {name}", f"{bundle.supervisor.state()}; OK {counts.get('ok', 0)} / "
                                         f"NG {counts.get('ng', 0)}")
        t.add_row("last NG", s.last_ng or "-")
        return t
