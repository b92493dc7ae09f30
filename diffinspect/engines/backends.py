"""Choosing the engine that runs the scoring graph: torch, onnxruntime or OpenVINO.

Every engine has `name`, `term_names` and `run(frames uint8 (N,S,S,C), mean, std) -> (maps, scores,
raw)`, plus `selection`: one line saying why it was chosen. Only the torch engine imports torch, and
only when it is chosen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.engines.exports import PRECISIONS, find_export, resolve_sampler_name

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that blocks it
        return False


def installed_backends() -> list[str]:
    return [b for b, mod in _MODULES.items() if _importable(mod)]


def precision_order(backend: str, device: str) -> tuple[str, ...]:
    """Exports to use when no precision is named, fastest first (measured by bench/backends.py)."""
    if backend == "onnxruntime":
        # The INT8 QDQ model keeps conv outputs float (accuracy), so onnxruntime's CPU provider cannot
        # fuse it into integer convs and runs dequantize + float conv: 0.8x fp32 at 128 px here. It is
        # for TensorRT, which builds INT8 kernels from QDQ models (untested: no GPU here); ask for it.
        return ("fp32", "int8")
    from diffinspect.engines.openvino_engine import available_devices, choose_device

    gpu = choose_device(device, available_devices()).startswith("GPU")
    return ("fp16", "int8", "fp32") if gpu else ("int8", "fp32", "fp16")


def build_engine(bundle: Bundle, backend: str, device: str = "auto", sampler: str | None = None,
                 precision: str | None = None):
    """The engine of one named backend (not auto); errors name what is present instead."""
    if backend not in installed_backends():
        raise DiffinspectError(f"backend {backend} is not installed here; present: {', '.join(installed_backends())}"
                               + (" (pip install 'diffinspect[train]' brings torch)" if backend == "torch" else ""))
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise DiffinspectError(f"the torch backend runs fp32 only; {precision} needs an exported bundle")
        from diffinspect.engines.torch_engine import TorchBackend

        return TorchBackend(bundle, device=device, sampler=sampler)
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    if fmt == "onnx":
        from diffinspect.engines.onnx_engine import OnnxEngine as Engine
        from diffinspect.engines.onnx_engine import available_providers, choose_providers

        choose_providers(device, available_providers())  # an unknown device fails before the file lookup
    else:
        from diffinspect.engines.openvino_engine import OpenVinoEngine as Engine
        from diffinspect.engines.openvino_engine import available_devices, choose_device

        choose_device(device, available_devices())
    name = resolve_sampler_name(bundle, sampler)
    name_file, rec = find_export(bundle, fmt, name, (precision,) if precision else precision_order(backend, device))
    for f in rec.get("files", [name_file]):
        bundle.file(f)  # sha256 again: a file swapped since loading is refused here
    return Engine(bundle.file(name_file), rec["terms"], device, rec["precision"])


def make_engine(bundle: Bundle, backend: str = "auto", device: str = "auto", sampler: str | None = None,
                precision: str | None = None, log: Callable[[str], None] | None = None):
    """backend: auto | torch | onnxruntime | openvino; precision: fp32 | fp16 | int8 | None (the
    fastest exported). auto tries the exported engines fastest first and keeps the first whose
    start-up self-check passes (see `autoselect`)."""
    if backend not in BACKENDS:
        raise DiffinspectError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise DiffinspectError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if backend == "auto":
        from diffinspect.engines.autoselect import pick_engine

        return pick_engine(bundle, device, sampler, precision, log)
    engine = build_engine(bundle, backend, device, sampler, precision)
    engine.selection = f"{engine.name} ({getattr(engine, 'precision', 'fp32')}): --backend {backend}"
    if log:
        log(f"backend {engine.selection}")
    return engine
