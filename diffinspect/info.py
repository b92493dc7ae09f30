"""`inspect info`: what this machine can run, and what a bundle holds (no torch import)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from diffinspect import __version__
from diffinspect.bundle import Bundle, Manifest, plain

PACKAGES = ("numpy", "onnxruntime", "openvino", "opencv-python-headless", "torch", "nncf")
# Training images seen (steps x batch) below which a model is called undertrained: a small U-Net trained a
# few dozen steps ranks defects no better than chance, while the demo's run finds them. Larger models
# need more.
MIN_IMAGES_SEEN = {"tiny": 1600, "small": 3200, "base": 6400}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions (read from package metadata: importing torch only to print its version costs seconds),
    onnxruntime providers and OpenVINO devices."""
    out: dict[str, Any] = {"diffinspect": __version__, "python": platform.python_version(),
                           "versions": {p: _version(p) for p in PACKAGES}}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime as ort

        out["onnxruntime_providers"] = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    if importlib.util.find_spec("openvino"):
        import openvino as ov

        core = ov.Core()
        out["openvino_devices"] = {d: core.get_property(d, "FULL_DEVICE_NAME") for d in core.available_devices}
        if "CPU" in core.available_devices:
            out["openvino_cpu_isa"] = openvino_cpu_isa(core)
    return out


def openvino_cpu_isa(core: Any = None) -> str:
    """The kernel OpenVINO's CPU plugin picks for an INT8 convolution (e.g. `brgconv_avx512_I8`,
    `jit_avx2_I8`), with VNNI when the CPU has it: INT8 results differ between these instruction sets
    (without VNNI, u8 x s8 products are summed in saturating 16-bit pairs). ONEDNN_MAX_CPU_ISA, when
    set, caps the instruction set (ONEDNN_MAX_CPU_ISA=AVX2 runs an AVX-512 machine as an AVX2 one)."""
    try:
        import openvino as ov
        from openvino import opset13 as ops

        core = core or ov.Core()

        def const(v: float) -> Any:
            return ops.constant(np.array(v, np.float32))

        x = ops.parameter([1, 16, 8, 8], ov.Type.f32)
        xq = ops.fake_quantize(x, const(0), const(2.55), const(0), const(2.55), 256)
        w = ops.constant(np.ones((16, 16, 3, 3), np.float32))
        wq = ops.fake_quantize(w, const(-1.27), const(1.27), const(-1.27), const(1.27), 255)
        y = ops.convolution(xq, wq, [1, 1], [1, 1], [1, 1], [1, 1])
        compiled = core.compile_model(ov.Model([y], [x]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        kernels = [str(rt["primitiveType"].astype(str)) for op in compiled.get_runtime_model().get_ordered_ops()
                   if op.get_friendly_name().startswith("Convolution") and "primitiveType" in (rt := op.get_rt_info())]
        kernel = next((k for k in kernels if k.endswith("_I8")), kernels[0] if kernels else "unknown")
    except Exception as exc:  # a plugin that cannot compile here: say so, info must not fail
        return f"unknown ({type(exc).__name__})"
    flags = _cpu_flags()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"INT8 convolution kernel {kernel}"
            + (f", capped by ONEDNN_MAX_CPU_ISA={capped}" if capped else (", CPU has VNNI" if vnni else ", no VNNI")))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def training_warning(manifest: Manifest) -> str | None:
    """A sentence when the bundle's model trained too few steps to be trusted, else None.

    Rule: steps x batch size must reach MIN_IMAGES_SEEN for the model size (200 steps at batch 16 for
    a small model, 100 for tiny, 400 for base)."""
    training, model = manifest.training, manifest.model
    if training is None or model is None:
        return None
    steps, batch = training.steps, training.batch_size
    if type(steps) is not int or type(batch) is not int or batch <= 0:
        return None
    need = MIN_IMAGES_SEEN.get(str(model.size), MIN_IMAGES_SEEN["small"])
    if steps * batch >= need:
        return None
    return (f"the model trained only {steps} steps at batch {batch}; a {model.size} model needs at least "
            f"{-(-need // batch)}: its scores may be no better than chance (train longer with --steps or "
            f"--max-minutes, on cores nothing else is using)")


def bundle_summary(path: str | Path) -> dict[str, Any]:
    from diffinspect.scoring.threshold import guarantee

    bundle = Bundle.load(path)
    m = bundle.manifest
    files = {name: (bundle.folder / name).stat().st_size for name in m.files}
    cal, training = m.calibration, m.training
    return {
        "path": str(bundle.path),
        "version": bundle.version,
        "model": plain(m.model),
        "preprocess": plain(m.preprocess),
        "sampler": plain(m.sampler),
        "training": {k: getattr(training, k) for k in ("steps", "seconds", "steps_per_second")}
        if training is not None and training.steps is not None else None,
        "training_warning": training_warning(m),
        "files": files,
        "calibration": {**{k: plain(getattr(cal, k)) for k in ("threshold", "n", "false_reject_rate", "backend",
                                                                "sampler")},
                        "fusion": cal.frame_term.rule.value if cal.frame_term else None,
                        "guarantee": guarantee(cal)}
        if cal else None,
        "exports": {name: {"format": r.format.value, "precision": r.precision.value, "sampler": r.sampler.value,
                           "parity": r.parity} for name, r in m.exports.items()},
    }
