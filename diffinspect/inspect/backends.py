"""Choosing the engine that runs the scoring graph: torch, onnxruntime or OpenVINO.

Every engine has `name` and `run(frames uint8 (N,S,S,C), mean, std) -> (maps, scores, raw)`.
"""

from __future__ import annotations

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle

BACKENDS = ("auto", "torch")


def make_engine(bundle: Bundle, backend: str = "auto", device: str = "auto", sampler: str | None = None):
    if backend not in BACKENDS:
        raise DiffinspectError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    from diffinspect.inspect.torch_backend import TorchBackend

    return TorchBackend(bundle, device=device, sampler=sampler)
