"""`export_bundle`: the whole scoring step as ONNX / OpenVINO IR, fp32 / fp16 / INT8, parity-checked.

Everything is built in a hidden work folder inside the bundle and checked against torch first; only
when every asked-for export passes parity are the files moved in and the manifest updated, once.
A refused export leaves the bundle exactly as it was.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffinspect import DiffinspectError, __version__
from diffinspect.bundle import Bundle, Export
from diffinspect.engines.exports import export_name
from diffinspect.export import parity
from diffinspect.vocab import ExportFormat, ModelKind, Precision, Sampler

log = logging.getLogger(__name__)

MAX_IMAGES = 48  # calibration frames for INT8 ranges and parity: enough for both, quick at any size
MAX_INPUTS = 96  # model inputs from them (frames, or tiles in tiles mode, where one frame gives many)


def plan(fmt: str, precision: str) -> list[tuple[str, str]]:
    """(format, precision) pairs to build. fp16 is an OpenVINO export only: onnxruntime's CPU provider
    has no fp16 speed-up, and there was no GPU here to validate an fp16 ONNX against."""
    formats = list(ExportFormat.values()) if fmt == "all" else [fmt]
    precisions = list(Precision.values()) if precision == "all" else [precision]
    if fmt not in (*ExportFormat.values(), "all"):
        raise DiffinspectError(f"unknown format {fmt!r}: choose onnx, openvino or all")
    if precision not in (*Precision.values(), "all"):
        raise DiffinspectError(f"unknown precision {precision!r}: choose fp32, fp16, int8 or all")
    if formats == ["onnx"] and precisions == ["fp16"]:
        raise DiffinspectError("no fp16 ONNX export: use --format openvino --precision fp16, or fp32/int8 "
                               "for onnxruntime")
    return [(f, p) for f in formats for p in precisions if not (f == "onnx" and p == "fp16")]


def _calibration_frames(bundle: Bundle, calibration_dir: str | Path | None) -> tuple[np.ndarray, str]:
    from diffinspect.data.reading import read_images
    from diffinspect.scoring.calibrate import image_sets
    from diffinspect.scoring.diffusion import fit_frames

    prep = bundle.manifest.preprocess
    try:
        _, calib, described = image_sets(bundle, calibration_dir)
    except DiffinspectError as exc:
        raise DiffinspectError(f"{exc}; to export, pass --calibration-dir GOOD_DIR") from None
    if len(calib) > MAX_IMAGES:
        idx = np.random.default_rng(0).choice(len(calib), MAX_IMAGES, replace=False)
        calib = [calib[i] for i in sorted(idx)]
    frames = read_images(calib, prep.color, "calibration images").frames
    if not frames:
        raise DiffinspectError(f"no readable calibration images ({described})")
    inputs = fit_frames(frames, prep)
    if len(inputs) > MAX_INPUTS:
        inputs = inputs[np.sort(np.random.default_rng(0).choice(len(inputs), MAX_INPUTS, replace=False))]
    return inputs, described


def _build(fmt: str, precision: str, work: Path, src: Path, nodes: dict[str, list[str]], frames: np.ndarray,
           mean: np.ndarray, std: np.ndarray, transformer: bool) -> tuple[list[str], dict[str, Any]]:
    """Write one export under `work`; returns (its files relative to the bundle, extra record fields)."""
    from diffinspect.export import quantize

    name, fp16_nodes, int8_nodes = export_name(fmt, precision), nodes["denoiser"], nodes["int8"]
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    if fmt == "onnx":
        if precision == "fp32":
            shutil.copyfile(src, work / name)
        else:
            quantize.onnx_int8(src, work / name, int8_nodes, frames, mean, std)
            extra["quantized_nodes"] = len(int8_nodes)
        return [name], extra
    if precision == "int8":
        extra["fake_quantize_nodes"] = quantize.openvino_int8(src, work / name, int8_nodes, frames, mean, std,
                                                                transformer)
    else:
        quantize.openvino_ir(src, work / name, fp16_nodes if precision == "fp16" else None)
    return [name, name.removesuffix(".xml") + ".bin"], extra


def _engine(fmt: str, path: Path, terms: list[str], precision: str):
    if fmt == "onnx":
        from diffinspect.engines.onnx_engine import OnnxEngine

        return OnnxEngine(path, terms, "cpu", precision)
    from diffinspect.engines.openvino_engine import OpenVinoEngine

    return OpenVinoEngine(path, terms, "CPU", precision)


def _run(engine_or_graph, frames: np.ndarray, mean: np.ndarray, std: np.ndarray, batch: int = 16):
    parts = [engine_or_graph(frames[i:i + batch], mean, std) for i in range(0, len(frames), batch)]
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def export_bundle(bundle_path: str | Path, format: str = "onnx", precision: str = "fp32",
                  calibration_dir: str | Path | None = None, allow_mismatch: bool = False,
                  sampler: str | None = None) -> dict[str, Export]:
    """Export, check parity, record. Returns {main file: export record} of what was written."""
    try:
        import torch
    except ImportError:
        raise DiffinspectError("exporting needs torch: pip install 'diffinspect[train]' on a training machine, "
                               "then copy the bundle; scoring it needs no torch") from None
    from diffinspect.export.onnx_graph import (
        INPUT_NAMES,
        OUTPUT_NAMES,
        denoiser_nodes,
        export_onnx,
        int8_nodes,
        rebuild_nodes,
        splice_backbone,
    )
    from diffinspect.export.rewrite import for_export
    from diffinspect.models.backbone import OnnxFeatures
    from diffinspect.models.from_bundle import load_graph
    from diffinspect.models.sampler import resolve_sampler
    from diffinspect.scoring.diffusion import CALIBRATION_FILE

    bundle = Bundle.load(bundle_path)
    targets = plan(format, precision)
    if bundle.manifest.calibration is None or not bundle.has(CALIBRATION_FILE):
        raise DiffinspectError(f"bundle {bundle.path} is not calibrated: run inspect calibrate first "
                               f"(parity is checked with its statistics)")
    sampler = resolve_sampler(bundle, sampler)
    fingerprint = bundle.manifest.graph_fingerprint(sampler)
    with np.load(bundle.file(CALIBRATION_FILE)) as z:
        mean, std = z["mean"].astype(np.float32), z["std"].astype(np.float32)
    frames, described = _calibration_frames(bundle, calibration_dir)
    check = parity.parity_frames(frames)
    log.info(f"exporting {', '.join(f'{f} {p}' for f, p in targets)} ({sampler} sampler); "
             f"calibration and parity on {described}")

    graph = load_graph(bundle, sampler).eval()
    with torch.no_grad():
        ref = _run(lambda f, m, s: tuple(o.numpy() for o in graph(torch.from_numpy(f), torch.from_numpy(m),
                                                                     torch.from_numpy(s))), check, mean, std)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=bundle.path))
    try:
        src = work / "scoring.fp32.onnx"
        example = (torch.from_numpy(frames[:2]), torch.from_numpy(mean), torch.from_numpy(std))
        export_onnx(for_export(graph), example, src)
        if isinstance(getattr(graph.backbone, "net", None), OnnxFeatures):
            splice_backbone(src, bundle.file(str(bundle.recipe.backbone.file)))
        import onnx

        proto = onnx.load(str(src))
        # INT8 quantizes the feature pass too unless that fails parity (see onnx_graph).
        int8_choices = {"denoiser": int8_nodes(proto), "rebuild": rebuild_nodes(proto)}
        if "patch" in graph.term_names:
            # The patch term whitens the frame's own encoder features, which amplifies INT8 rounding there
            # past the map parity bar (tests/test_export.py): its encoder pass stays float.
            del int8_choices["denoiser"]
        fp16 = denoiser_nodes(proto)
        records, failed = {}, []
        is_dit = bundle.model.kind == ModelKind.DIT
        for fmt, prec in targets:
            for scope, int8 in int8_choices.items() if prec == "int8" else [(None, [])]:
                t0 = time.perf_counter()
                files, extra = _build(fmt, prec, work, src, {"denoiser": fp16, "int8": int8}, frames, mean, std,
                                      is_dit)
                engine = _engine(fmt, work / files[0], graph.term_names, prec)
                figures = parity.compare(ref, _run(engine.run, check, mean, std), len(frames))
                ok = parity.passes(figures)
                if ok or scope != "denoiser":
                    break
                log.info(f"  {files[0]:26s} {parity.describe(figures)} with the feature pass in INT8: "
                         f"keeping it in float")
            if scope:
                extra["int8_scope"] = scope
            log.info(f"  {files[0]:26s} {'ok ' if ok else 'BAD'} {parity.describe(figures)} [{engine.name}, "
                     f"{time.perf_counter() - t0:.1f} s]")
            if not ok:
                failed.append(f"{files[0]} (score rank correlation {figures['score_rank_correlation']:.4f})")
            records[files[0]] = Export(
                format=ExportFormat(fmt), precision=Precision(prec), sampler=Sampler(sampler), files=files,
                fingerprint=fingerprint, inputs=list(INPUT_NAMES), outputs=list(OUTPUT_NAMES),
                terms=list(graph.term_names), parity={**figures, "engine": engine.name, "passed": ok}, **extra,
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                versions=_versions(fmt, torch.__version__))
        if failed and not allow_mismatch:
            raise DiffinspectError(f"export refused, nothing written: parity below {parity.MIN_RANK_CORRELATION} "
                                   f"for {', '.join(failed)} (--allow-mismatch to keep it anyway)")
        with bundle.updating("export") as up:
            for name, rec in records.items():
                for f in rec.files:
                    staged = up.staging_path(f)
                    os.replace(work / f, staged)
                    up.add_file(f, staged)
                up.manifest.exports[name] = rec
        log.info(f"wrote {len(records)} export(s) into {bundle.path}")
        return records
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _versions(fmt: str, torch_version: str) -> dict[str, str]:
    import onnxruntime

    out = {"diffinspect": __version__, "torch": torch_version, "onnxruntime": onnxruntime.__version__}
    if fmt == "openvino":
        import openvino

        out["openvino"] = openvino.__version__
    return out
