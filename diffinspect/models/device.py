"""The torch device a command asked for (training, distillation and the torch engine share it)."""

from __future__ import annotations

import torch

from diffinspect import DiffinspectError


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise DiffinspectError("CUDA was asked for (--device cuda) but no CUDA device is available")
        return torch.device(requested)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    raise DiffinspectError(f"unknown device {requested!r}: use auto, cpu or cuda")
