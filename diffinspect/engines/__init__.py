"""Engines run a bundle's scoring graph: onnxruntime, OpenVINO (exported, no torch) or torch (eager).

`select.make_engine` builds one by name, or picks the fastest that passes its start-up self-check.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Engine(Protocol):
    """What every engine keeps, whatever runs the graph."""

    name: str  # "onnxruntime:CPUExecutionProvider", "openvino:CPU", "torch:cpu", ...
    precision: str  # fp32 | fp16 | int8
    term_names: list[str]  # the raw error terms, in the order of `run`'s third output
    selection: str  # one line saying why this engine was chosen (set by `select`)

    def run(self, frames: np.ndarray, mean: np.ndarray, std: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 frames (N, S, S, C) and the calibration statistics -> (maps, scores, raw terms), float32."""
        ...
