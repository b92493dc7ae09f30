"""The torch engine: the scoring graph run eagerly on CPU or CUDA (needs the [train] extra)."""

from __future__ import annotations

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle


class TorchEngine:
    precision = "fp32"
    selection = ""

    def __init__(self, bundle: Bundle, device: str = "auto", sampler: str | None = None, recipe=None):
        try:
            import torch
        except ImportError:
            raise DiffinspectError("the torch backend needs torch: pip install 'diffinspect[train]', "
                                   "or export the bundle and use --backend openvino/onnxruntime") from None
        from diffinspect.models.device import resolve_device
        from diffinspect.models.from_bundle import load_graph

        self.torch = torch
        self.device = resolve_device(device)
        self.graph = load_graph(bundle, sampler, recipe).to(self.device)
        self.name = f"torch:{self.device.type}"
        self.term_names = self.graph.term_names

    def run(self, frames: np.ndarray, mean: np.ndarray, std: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            out = self.graph(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device),
                             torch.from_numpy(mean).to(self.device), torch.from_numpy(std).to(self.device))
        return tuple(o.float().cpu().numpy() for o in out)
