"""The OpenVINO engine: an exported scoring graph as IR (openvino/model[.fp16|.int8].xml), no torch.

Devices: auto (GPU when OpenVINO sees one, else CPU), CPU, GPU, NPU, AUTO (OpenVINO's own switching
plugin). On CPU the inference precision is always pinned to f32: these CPUs default to bf16, which
is slower and less precise on them (DESIGN.md's known traps), and the error arithmetic in the graph (1 - SSIM, z-scores)
needs float32 even in the INT8 model, whose quantized convolutions ignore the hint anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.engines.exports import cache_dir, runtime_threads

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def available_devices() -> list[str]:
    import openvino as ov

    return list(ov.Core().available_devices)


def choose_device(device: str, available: list[str]) -> str:
    families = {d.split(".")[0] for d in available}  # "GPU.0", "GPU.1" -> GPU
    key = device.upper()
    if key == "AUTO" and device != "AUTO":  # our "auto": a GPU if there is one, else the CPU
        key = "GPU" if "GPU" in families else "CPU"
    if key == "AUTO" or key in available or key in families:
        return key
    raise DiffinspectError(f"OpenVINO device {device!r} is not available here; devices present: "
                           f"{', '.join(available)} (use --device auto, {', '.join(sorted(families))} or AUTO)")


def compile_config(device: str, precision: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    family = device.split(".")[0]
    if family == "CPU":
        config.update(F32)
        config["PERFORMANCE_HINT"] = "LATENCY"  # one micro-batch at a time, all cores on it
        if threads := runtime_threads():
            config["INFERENCE_NUM_THREADS"] = threads
    elif family == "GPU" and precision != "fp16":
        config.update(F32)  # fp32/INT8 IR: keep the float parts in f32 (GPU defaults to f16)
    elif family == "AUTO":
        config["DEVICE_PROPERTIES"] = {"CPU": dict(F32)}
    return config


class OpenVinoEngine:
    """`run(frames uint8 (N,S,S,C), mean, std) -> (maps, scores, raw)` as float32 numpy arrays.

    On CPU and NPU the model is compiled for one frame (static shape) and a batch runs frame by frame:
    faster than the dynamic-batch model and than a static batch (bench/backends.py; dynamic shapes cost
    shape inference and memory planning on every call), and NPUs take static shapes only.
    GPUs keep the dynamic batch, where batching pays.
    """

    def __init__(self, xml_path: str | Path, term_names: list[str], device: str = "auto",
                 precision: str = "fp32") -> None:
        import openvino as ov

        core = ov.Core()
        target = choose_device(device, list(core.available_devices))
        core.set_property({"CACHE_DIR": str(cache_dir("openvino"))})
        xml_path = Path(xml_path)
        try:
            model = core.read_model(str(xml_path), str(xml_path.with_suffix(".bin")))
            self.per_frame = target.split(".")[0] in ("CPU", "NPU")
            if self.per_frame:
                frame = model.inputs[0]
                model.reshape({frame.get_any_name(): [1, *list(frame.get_partial_shape())[1:]]})
            self.compiled = core.compile_model(model, target, compile_config(target, precision))
        except RuntimeError as exc:
            raise DiffinspectError(f"OpenVINO cannot load {xml_path.name} on {target}: {exc}") from None
        self.request = self.compiled.create_infer_request()
        running = target
        if target == "AUTO":
            running = f"AUTO({','.join(self.compiled.get_property('EXECUTION_DEVICES'))})"
        self.name = f"openvino:{running}"
        self.precision = precision
        self.term_names = list(term_names)

    def run(self, frames: np.ndarray, mean: np.ndarray, std: np.ndarray):
        mean = np.ascontiguousarray(mean, np.float32)
        std = np.ascontiguousarray(std, np.float32)
        frames = np.ascontiguousarray(frames, np.uint8)
        if not self.per_frame:
            return self._infer(frames, mean, std)
        parts = [self._infer(frames[i:i + 1], mean, std) for i in range(len(frames))]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    def _infer(self, frames: np.ndarray, mean: np.ndarray, std: np.ndarray):
        result = self.request.infer([frames, mean, std])
        # The request reuses its output buffers on the next call: copy them out.
        return tuple(np.array(result[out], dtype=np.float32, copy=True) for out in self.compiled.outputs)
