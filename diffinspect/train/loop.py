"""What every training loop here shares: the step / time budget, the checkpoint, resume and Ctrl-C,
and snapshots of the model at given CPU minutes (for time-to-accuracy curves).

`fit` (the denoiser) and `distill` (the student) keep their own step and state; this module keeps the
rules they must agree on: a budget in steps or minutes, a checkpoint written atomically (a crash while
saving never leaves a half-written one), elapsed time that survives a resume, and Ctrl-C saving a
checkpoint and ending in one line that says how to continue.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from diffinspect import DiffinspectError

UNBOUNDED = 10**9  # steps when only a time budget is given


def budget(steps: int | None, max_minutes: float | None, default_steps: int,
           default_minutes: float) -> tuple[int, float | None]:
    """(total steps, minutes or None): neither given -> both defaults apply (whichever ends first);
    one given -> only that one; both -> both."""
    total = steps if steps is not None else (default_steps if max_minutes is None else UNBOUNDED)
    minutes = max_minutes if max_minutes is not None else (default_minutes if steps is None else None)
    return total, minutes


class Clock:
    """Elapsed seconds over this run and the runs it resumes; `over` once the budget is spent."""

    def __init__(self, minutes: float | None, before: float = 0.0) -> None:
        self.minutes, self.before, self.t0 = minutes, before, time.monotonic()

    def session(self) -> float:
        return time.monotonic() - self.t0

    def elapsed(self) -> float:
        return self.before + self.session()

    def over(self) -> bool:
        return self.minutes is not None and self.elapsed() >= self.minutes * 60

    def share(self) -> float:
        """Share of the time budget spent (0 without one)."""
        return self.elapsed() / (self.minutes * 60) if self.minutes else 0.0


def cpu_minutes() -> float:
    """This process's CPU time over torch's intra-op threads, in minutes: what training would have taken
    alone on that many idle cores. Unlike a wall clock it does not count the share of the cores that other
    jobs take, so a minute means the same on a loaded machine as on an idle one."""
    return time.process_time() / torch.get_num_threads() / 60


class Snapshots:
    """Calls `write(minutes, step)` once training has run each of `minutes` CPU minutes (see cpu_minutes),
    counted from the first `tick`; the time spent writing is not counted as training."""

    def __init__(self, minutes: list[float], write: Callable[[float, int], None]) -> None:
        if not minutes or min(minutes) <= 0:
            raise DiffinspectError(f"snapshot minutes must be positive, got {minutes}")
        self.pending, self.write, self.start = sorted(set(minutes)), write, None

    def trained(self) -> float:
        """CPU minutes of training so far (0 before the first tick)."""
        return 0.0 if self.start is None else cpu_minutes() - self.start

    @property
    def done(self) -> bool:
        return not self.pending

    def tick(self, step: int) -> None:
        if self.start is None:
            self.start = cpu_minutes()
        while self.pending and self.trained() >= self.pending[0]:
            before = cpu_minutes()
            self.write(self.pending.pop(0), step)
            self.start += cpu_minutes() - before


class Checkpoint:
    """`<folder>/last.pt`, saved atomically; `what` names it in messages ("", "distillation")."""

    def __init__(self, folder: Path, what: str = "") -> None:
        self.folder, self.path, self.what = folder, folder / "last.pt", what

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self, map_location: torch.device | str = "cpu") -> dict:
        if not self.path.exists():
            label = f"{self.what} checkpoint" if self.what else "checkpoint"
            raise DiffinspectError(f"nothing to resume: no {label} at {self.path}")
        return torch.load(self.path, map_location=map_location, weights_only=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def on_interrupt(self, what: str, unit: str, position: Callable[[], int], save: Callable[[], None]
                     ) -> Iterator[None]:
        """Ctrl-C inside: save, then one line naming the checkpoint and how to continue."""
        try:
            yield
        except KeyboardInterrupt:
            save()
            raise DiffinspectError(f"{what} interrupted at {unit} {position()}; checkpoint saved to {self.path} "
                                   f"(run the same command with --resume to continue)") from None
