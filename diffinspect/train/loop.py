"""What every training loop here shares: the step / time budget, the checkpoint, resume and Ctrl-C.

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
