"""Which sampler of a bundle runs: the teacher (N DDIM steps) or the distilled student (no torch).

One resolver for both sides: the torch graph loader (`models.from_bundle`) and the exported engines.
"""

from __future__ import annotations

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.vocab import Sampler


def resolve_sampler(bundle: Bundle, sampler: str | None) -> str:
    """The sampler asked for, else the bundle's default; refused when the bundle cannot run it."""
    name = sampler or bundle.manifest.sampler.default
    if name not in Sampler.values():
        raise DiffinspectError(f"unknown sampler {name!r}: use teacher or student")
    if name == "student" and bundle.manifest.student is None:
        raise DiffinspectError(f"bundle {bundle.path} has no distilled student (run `inspect distill`)")
    return Sampler(name).value
