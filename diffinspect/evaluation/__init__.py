"""Offline evidence: evaluation on labelled images, report, metrics, classical baselines, corruptions.

Needs the `evaluate` extra (scikit-learn, PyOD, matplotlib), which the edge install leaves out.
"""

from __future__ import annotations

import importlib.util

from diffinspect import DiffinspectError

if importlib.util.find_spec("sklearn") is None:
    raise DiffinspectError("evaluation needs the evaluate extra: pip install 'diffinspect[evaluate]'")
