"""Offline evidence: evaluation on labelled images, report, metrics, classical baselines, corruptions.

Needs the `evaluate` extra (scikit-learn, PyOD, matplotlib), which the edge install leaves out: callers
check with `require_extra()` before importing a module of this package.
"""

from __future__ import annotations

import importlib.util

from diffinspect import DiffinspectError


def require_extra() -> None:
    """Refuse in one line where the evaluate extra is not installed (instead of an import traceback)."""
    if importlib.util.find_spec("sklearn") is None:
        raise DiffinspectError("evaluation needs the evaluate extra: pip install 'diffinspect[evaluate]'")
