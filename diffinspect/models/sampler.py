"""Which sampler of a bundle runs: the teacher (N DDIM steps) or the distilled student (no torch).

One resolver for both sides: the torch graph loader (`models.from_bundle`) and the exported engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffinspect import DiffinspectError
from diffinspect.vocab import Sampler

if TYPE_CHECKING:  # a type only: the bundle module reads models' recipe and schedule
    from diffinspect.bundle import Bundle


def resolve_sampler(bundle: Bundle, sampler: str | None) -> str:
    """The sampler asked for, else the bundle's default; refused when the bundle cannot run it."""
    name = sampler or bundle.manifest.sampler.default
    if name not in Sampler.values():
        raise DiffinspectError(f"unknown sampler {name!r}: use teacher or student")
    if name == "student" and bundle.manifest.student is None:
        raise DiffinspectError(f"bundle {bundle.path} has no distilled student (run `inspect distill`)")
    return Sampler(name).value
