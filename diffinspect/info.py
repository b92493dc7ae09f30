"""`inspect info`: what this machine can run, and what a bundle holds (no torch import)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from pathlib import Path
from typing import Any

from diffinspect import __version__
from diffinspect.bundle import Bundle

PACKAGES = ("numpy", "onnxruntime", "openvino", "opencv-python-headless", "torch", "nncf")


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
    return out


def bundle_summary(path: str | Path) -> dict[str, Any]:
    bundle = Bundle.load(path)
    m = bundle.manifest
    files = {name: (bundle.path / name).stat().st_size for name in m.get("files", {})}
    cal = m.get("calibration") or {}
    return {
        "path": str(bundle.path),
        "model": m.get("model"),
        "preprocess": m.get("preprocess"),
        "sampler": m.get("sampler"),
        "files": files,
        "calibration": {k: cal.get(k) for k in ("threshold", "n", "false_reject_rate", "backend", "sampler")}
        if cal else None,
        "exports": {name: {"format": r.get("format"), "precision": r.get("precision"), "sampler": r.get("sampler"),
                           "parity": r.get("parity", {})} for name, r in (m.get("exports") or {}).items()},
    }
