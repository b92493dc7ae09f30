"""The onnxruntime engine: an exported scoring graph (model.onnx / model.int8.onnx), no torch.

Devices map to execution providers: auto = the first present of TensorRT, CUDA, CPU; cpu; cuda;
tensorrt; or a provider's full name. A GPU provider that fails to start makes onnxruntime fall back
to the CPU silently, so the session's first provider is checked against the one asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.engines.exports import cache_dir, runtime_threads

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
ALIASES = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(device: str, available: list[str]) -> list[str]:
    """The provider list for a device name; a DiffinspectError naming the present ones otherwise."""
    key = device.lower()
    if key == "auto":
        wanted: tuple[str, ...] = tuple(p for p in PREFERENCE if p in available)
    elif key in ALIASES:
        wanted = ALIASES[key]
    elif device in available:
        wanted = (device, "CPUExecutionProvider") if device != "CPUExecutionProvider" else (device,)
    else:
        wanted = ()
    if not wanted or wanted[0] not in available:
        raise DiffinspectError(
            f"onnxruntime device {device!r} is not available here; providers present: {', '.join(available)} "
            f"(use --device auto, cpu{', cuda' if 'CUDAExecutionProvider' in available else ''}"
            f"{', tensorrt' if 'TensorrtExecutionProvider' in available else ''})")
    return [p for p in wanted if p in available]


def _provider_options(provider: str) -> dict[str, str]:
    if provider == "TensorrtExecutionProvider":
        # Building a TensorRT engine takes minutes; the cache makes the second start fast.
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir("tensorrt"))}
    return {}


class OnnxEngine:
    """`run(frames uint8 (N,S,S,C), mean, std) -> (maps, scores, raw)` as float32 numpy arrays."""

    def __init__(self, model_path: str | Path, term_names: list[str], device: str = "auto",
                 precision: str = "fp32") -> None:
        import onnxruntime as ort

        providers = choose_providers(device, available_providers())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = runtime_threads()
        opts.inter_op_num_threads = 1  # one request at a time: parallelism is inside the ops
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # initializer/provider chatter is not the user's business
        try:
            self.session = ort.InferenceSession(
                str(model_path), opts, providers=[(p, _provider_options(p)) for p in providers])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files/providers
            raise DiffinspectError(f"onnxruntime cannot load {Path(model_path).name}: {exc}") from None
        running = self.session.get_providers()[0]
        if running != providers[0]:
            raise DiffinspectError(f"onnxruntime could not start {providers[0]} (fell back to {running})")
        self.name = f"onnxruntime:{running}"
        self.precision = precision
        self.term_names = list(term_names)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, frames: np.ndarray, mean: np.ndarray, std: np.ndarray):
        feeds = dict(zip(self.input_names, (np.ascontiguousarray(frames, np.uint8),
                                            np.ascontiguousarray(mean, np.float32),
                                            np.ascontiguousarray(std, np.float32)), strict=True))
        maps, scores, raw = self.session.run(None, feeds)
        return maps.astype(np.float32), scores.astype(np.float32), raw.astype(np.float32)
