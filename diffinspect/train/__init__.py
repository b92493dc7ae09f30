"""Training: photos of good parts in, a verified model bundle out."""

from __future__ import annotations

from diffinspect.train.api import train

__all__ = ["train"]
