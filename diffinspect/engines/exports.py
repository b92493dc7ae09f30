"""What a bundle holds in `manifest["exports"]`, and the settings the runtime engines share (no torch).

Each export record is keyed by its main file ("model.onnx", "openvino/model.int8.xml") and lists
format, precision, sampler, files, input and output names, the scoring terms and the parity figures
measured when it was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.models.recipe import PATCH_FILE

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
THREADS_ENV = "DIFFINSPECT_THREADS"
CACHE_ENV = "DIFFINSPECT_CACHE_DIR"
CALIBRATION_FILE = "calibration.npz"  # statistics, calibration scores and self-check references


def export_name(fmt: str, precision: str) -> str:
    """The main file of an export: model.onnx, model.int8.onnx, openvino/model.fp16.xml, ..."""
    suffix = "" if precision == "fp32" else f".{precision}"
    return f"model{suffix}.onnx" if fmt == "onnx" else f"openvino/model{suffix}.xml"


def graph_fingerprint(bundle: Bundle, sampler: str) -> str:
    """What an exported graph was built from: model, recipe, schedule, sampler, weights and patch statistics
    (by sha256).
    The recipe (t*, term weights, blur, top-k) is baked into the graph, so re-tuning it, retraining or
    re-distilling makes older exports stale."""
    m = bundle.manifest
    info = m.get("sampler") or {}
    weights = ["weights.pt"] + ([info["student"]["weights"]] if sampler == "student" and info.get("student") else [])
    weights += [PATCH_FILE] if bundle.has(PATCH_FILE) else []  # the patch term's statistics are graph constants
    payload = {"model": {k: (m.get("model") or {}).get(k) for k in ("kind", "size", "image_size", "channels")},
               "score": m.get("score"), "schedule": m.get("schedule"), "sampler": sampler,
               "student": info.get("student"), "weights": {f: m.get("files", {}).get(f) for f in weights}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _usable(bundle: Bundle, name: str, rec: dict[str, Any] | None, sampler: str) -> bool:
    return bool(rec) and rec.get("sampler") == sampler and bundle.has(name) and \
        rec.get("fingerprint") == graph_fingerprint(bundle, sampler)


def find_export(bundle: Bundle, fmt: str, sampler: str, precisions: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The first usable export of `fmt` for `sampler` among `precisions` (in that order of preference)."""
    exports = bundle.manifest.get("exports") or {}
    for precision in precisions:
        name = export_name(fmt, precision)
        if _usable(bundle, name, exports.get(name), sampler):
            return name, exports[name]
    stale = [k for k, v in exports.items() if v.get("sampler") == sampler and not _usable(bundle, k, v, sampler)]
    have = ", ".join(f"{k} ({v.get('sampler')}{', stale' if k in stale else ''})" for k, v in exports.items())
    fmt_flag = "onnx" if fmt == "onnx" else "openvino"
    why = "; stale = made from other weights or another scoring recipe" if stale else ""
    raise DiffinspectError(
        f"bundle {bundle.path} has no usable {fmt} export ({'/'.join(precisions)}) for the {sampler} sampler "
        f"(exports: {have or 'none'}{why}): "
        f"run `inspect export {bundle.path} --format {fmt_flag} --precision {precisions[0]}`")


def exported_precisions(bundle: Bundle, fmt: str, sampler: str) -> list[str]:
    exports = bundle.manifest.get("exports") or {}
    return [p for p in PRECISIONS if _usable(bundle, export_name(fmt, p), exports.get(export_name(fmt, p)), sampler)]


def available_cores() -> int:
    """The cores this process may run on: a container's cpuset or taskset's share, not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def runtime_threads() -> int:
    """Intra-op threads for onnxruntime / OpenVINO: DIFFINSPECT_THREADS, else OMP_NUM_THREADS, else the
    cores this process may run on when that is fewer than the machine has (a container's cpuset, taskset:
    the runtimes' defaults count the host's cores and would oversubscribe), else 0 (each runtime's own
    default: one per physical core). A camera box often shares its cores with the capture software, so
    the variable lets the station cap them."""
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    allowed = available_cores()
    return allowed if allowed < (os.cpu_count() or allowed) else 0


def cache_dir(kind: str) -> Path:
    """Compiled-model caches (TensorRT engines, OpenVINO blobs): DIFFINSPECT_CACHE_DIR, else a folder
    under the system temp dir; never $HOME, which may be read-only or shared on a line PC."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "diffinspect-cache")
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
