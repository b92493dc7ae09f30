"""Choosing the engine that runs the scoring graph: torch, onnxruntime or OpenVINO.

`make_engine` builds the backend named, or with `--backend auto` the fastest exported engine that
reproduces the calibration's reference scores. Only the torch engine imports torch, and only when it
is chosen.

Self-check (auto). Calibration stores a few frames (`selfcheck_frames`) and the scores the calibrating backend gave them
(`selfcheck_scores`). At start-up each candidate scores those frames with the bundle's statistics; it
passes when every score is within SELFCHECK_TOLERANCE x σ, the spread of good parts' graph scores
(`graph_score_spread`). One σ is above what a sound export deviates and well below what a broken one
does (a sound INT8 export stays well inside it, fp16 far inside; INT8 with x and its rebuild through
separate feature-pass quantizers, a broken recipe, see export/onnx_graph.py, lands well outside), so a
failure means "do not trust this engine", and auto falls through to the next one. The spread is taken
from the calibration scores, not from the reference images', which are tighter (the model was fitted on
them).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Calibration
from diffinspect.engines import Engine
from diffinspect.engines.exports import CALIBRATION_FILE, exported_precisions, find_export
from diffinspect.models.sampler import resolve_sampler
from diffinspect.vocab import Backend, Precision

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffinspect.engines.onnx_engine import OnnxEngine
    from diffinspect.engines.openvino_engine import OpenVinoEngine

# Exports to use when no precision is named, fastest first (measured by bench/backends.py).
# The INT8 QDQ model keeps conv outputs float (accuracy), so onnxruntime's CPU provider cannot fuse it
# into integer convs and runs dequantize + float conv, slower than fp32 on CPU. It is for TensorRT,
# which builds INT8 kernels from QDQ models (untested: no GPU here); ask for it.
ONNXRUNTIME_ORDER = ("fp32", "int8")
OPENVINO_CPU_ORDER = ("int8", "fp32", "fp16")
OPENVINO_GPU_ORDER = ("fp16", "int8", "fp32")
_MODULES = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that blocks it
        return False


def installed_backends() -> list[str]:
    return [b for b, mod in _MODULES.items() if _importable(mod)]


def precision_order(backend: str, device: str) -> tuple[str, ...]:
    """The export order of one named backend on a device."""
    if backend == "onnxruntime":
        return ONNXRUNTIME_ORDER
    from diffinspect.engines.openvino_engine import available_devices, choose_device

    gpu = choose_device(device, available_devices()).startswith("GPU")
    return OPENVINO_GPU_ORDER if gpu else OPENVINO_CPU_ORDER


def build_engine(bundle: Bundle, backend: str, device: str = "auto", sampler: str | None = None,
                 precision: str | None = None) -> Engine:
    """The engine of one named backend (not auto); errors name what is present instead."""
    if backend not in installed_backends():
        raise DiffinspectError(f"backend {backend} is not installed here; present: {', '.join(installed_backends())}"
                               + (" (pip install 'diffinspect[train]' brings torch)" if backend == "torch" else ""))
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise DiffinspectError(f"the torch backend runs fp32 only; {precision} needs an exported bundle")
        from diffinspect.engines.torch_engine import TorchEngine

        return TorchEngine(bundle, device=device, sampler=sampler)
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    if fmt == "onnx":
        from diffinspect.engines.onnx_engine import OnnxEngine, available_providers, choose_providers

        choose_providers(device, available_providers())  # an unknown device fails before the file lookup
        runner: type[OnnxEngine] | type[OpenVinoEngine] = OnnxEngine
    else:
        from diffinspect.engines.openvino_engine import OpenVinoEngine, available_devices, choose_device

        choose_device(device, available_devices())
        runner = OpenVinoEngine
    name = resolve_sampler(bundle, sampler)
    name_file, rec = find_export(bundle, fmt, name, (precision,) if precision else precision_order(backend, device))
    for f in rec.files or [name_file]:
        bundle.file(f)  # sha256 again: a file swapped since loading is refused here
    return runner(bundle.file(name_file), rec.terms, device, rec.precision.value)


def make_engine(bundle: Bundle, backend: str = "auto", device: str = "auto", sampler: str | None = None,
                precision: str | None = None) -> Engine:
    """backend: auto | torch | onnxruntime | openvino; precision: fp32 | fp16 | int8 | None (the
    fastest exported). auto tries the exported engines fastest first and keeps the first whose
    start-up self-check passes (`pick_engine`)."""
    if backend not in Backend.values():
        raise DiffinspectError(f"unknown backend {backend!r}: choose one of {Backend.listed()}")
    if precision is not None and precision not in Precision.values():
        raise DiffinspectError(f"unknown precision {precision!r}: choose one of {Precision.listed()}")
    if backend == "auto":
        return pick_engine(bundle, device, sampler, precision)
    engine = build_engine(bundle, backend, device, sampler, precision)
    engine.selection = f"{engine.name} ({engine.precision}): --backend {backend}"
    log.debug(f"backend {engine.selection}")
    return engine


# --- auto: the fastest engine that passes its self-check ----------------------------------------

SELFCHECK_TOLERANCE = 1.0


@dataclass
class Reference:
    frames: np.ndarray
    scores: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    tolerance: float


def load_reference(bundle: Bundle) -> Reference | None:
    # No calibration in the manifest (never calibrated, or a re-tuned recipe voided it): the file, if
    # any, holds scores of another recipe.
    cal = bundle.manifest.calibration
    if cal is None or not bundle.has(CALIBRATION_FILE):
        return None
    z = bundle.arrays(CALIBRATION_FILE, {"mean": None, "std": None, "scores": None})  # no pickles
    if "selfcheck_frames" not in z or "selfcheck_scores" not in z:
        return None
    ref_scores = z["selfcheck_scores"].astype(np.float64)
    spread = graph_score_spread(cal, z["scores"])
    # The floor keeps a degenerate calibration (all scores equal) from failing every engine.
    tol = max(SELFCHECK_TOLERANCE * spread, 1e-4 * (1.0 + float(np.abs(ref_scores).max())))
    return Reference(z["selfcheck_frames"], ref_scores, z["mean"], z["std"], tol)


def graph_score_spread(calibration: Calibration, scores: np.ndarray) -> float:
    """Standard deviation of the graph's image scores on good parts. With a frame-level term the stored
    calibration scores are the combined ones (another scale); the graph scores' spread is then the IQR
    of the reference images' diffusion scores, divided by 1.349 (the IQR of a unit normal)."""
    if calibration.frame_term is not None:
        return calibration.frame_term.diffusion[1] / 1.349
    return float(np.std(scores)) if len(scores) > 1 else 0.0


def selfcheck(engine: Engine, ref: Reference) -> tuple[bool, str]:
    _, scores, _ = engine.run(ref.frames, ref.mean, ref.std)
    worst = float(np.max(np.abs(scores.astype(np.float64) - ref.scores)))
    ok = bool(np.isfinite(worst)) and worst <= ref.tolerance
    return ok, f"max score deviation {worst:.3g} {'<=' if ok else '>'} tolerance {ref.tolerance:.3g}"


def candidates(bundle: Bundle, device: str, sampler: str, precision: str | None) -> list[tuple[str, str, str | None]]:
    """(backend, device, precision), fastest first, among the exports this bundle holds."""
    have = installed_backends()
    out: list[tuple[str, str, str | None]] = []
    key = device.lower()

    def add(backend: str, dev: str, order: tuple[str, ...]) -> None:
        if backend not in have:
            return
        fmt = "onnx" if backend == "onnxruntime" else "openvino"
        exported = exported_precisions(bundle, fmt, sampler)
        out.extend((backend, dev, p) for p in order if p in exported and precision in (None, p))

    if key == "auto" and "onnxruntime" in have:
        from diffinspect.engines.onnx_engine import GPU_PROVIDERS, available_providers

        if any(p in available_providers() for p in GPU_PROVIDERS):
            add("onnxruntime", "auto", ONNXRUNTIME_ORDER[:1])  # its int8 is tried on the CPU below
    if key in ("auto", "gpu") and "openvino" in have:
        from diffinspect.engines.openvino_engine import available_devices

        if any(d.startswith("GPU") for d in available_devices()):
            add("openvino", "GPU", OPENVINO_GPU_ORDER)
    if key in ("auto", "cpu"):
        add("openvino", "CPU", OPENVINO_CPU_ORDER)
        add("onnxruntime", "cpu", ONNXRUNTIME_ORDER)
    else:  # a specific device name: every backend that may know it, errors fall through
        add("onnxruntime", device, ONNXRUNTIME_ORDER)
        add("openvino", device, OPENVINO_GPU_ORDER)  # a named device other than the CPU: an accelerator
    if "torch" in have and precision in (None, "fp32"):
        out.append(("torch", device, None))
    return out


def pick_engine(bundle: Bundle, device: str, sampler: str | None, precision: str | None) -> Engine:
    name = resolve_sampler(bundle, sampler)
    ref = load_reference(bundle)
    order = candidates(bundle, device, name, precision)
    if ref is None:  # nothing to check exports against: torch, where present, is the reference itself
        order.sort(key=lambda c: c[0] != "torch")
    tried: list[str] = []
    for backend, dev, prec in order:
        label = f"{backend}:{dev}:{prec or 'fp32'}"
        try:
            engine = build_engine(bundle, backend, dev, name, prec)
        except DiffinspectError as exc:
            tried.append(f"{label} unavailable ({exc})")
            continue
        if ref is None:
            why = "no self-check reference (bundle not calibrated yet)"
        else:
            ok, why = selfcheck(engine, ref)
            if not ok:
                tried.append(f"{label} failed self-check ({why})")
                continue
        skipped = f"; skipped: {'; '.join(tried)}" if tried else ""
        engine.selection = f"{engine.name} ({prec or 'fp32'}): fastest passing candidate, {why}{skipped}"
        log.debug(f"backend auto -> {engine.selection}")
        return engine
    if not tried:  # no export for this sampler, and no torch to run the bundle's weights
        raise DiffinspectError(f"bundle {bundle.path} has no export for the {name} sampler and torch is not "
                               f"installed: run `inspect export {bundle.path} --format openvino` where torch is")
    raise DiffinspectError(f"no backend passed for bundle {bundle.path}: {'; '.join(tried) or 'none available'}")
