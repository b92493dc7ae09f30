"""Export of the scoring graph (ONNX, OpenVINO; fp32, fp16, INT8), the runtime engines, auto selection,
and the edge install (scoring and re-calibrating an exported bundle with torch unimportable)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from logged import logged

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.engines import select as autoselect
from diffinspect.engines.exports import CACHE_ENV
from diffinspect.engines.select import make_engine
from diffinspect.export import parity
from diffinspect.scoring.diffusion import CALIBRATION_FILE, DiffusionDetector, Stats

EXPECTED = {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.fp16.xml",
            "openvino/model.int8.xml"}
# Importing this package fails, as torch does on the edge install (pip install diffinspect, no extras).
TORCH_BLOCKER = 'raise ImportError("torch is not installed on this edge box (test blocker)")\n'


@pytest.fixture(scope="module", autouse=True)
def engine_cache(tmp_path_factory):
    """Compiled-engine caches in pytest's temp folders (subprocesses inherit the variable)."""
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("engine-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def exported(calibrated_bundle, tmp_path_factory):
    from diffinspect.export import export_bundle

    path = tmp_path_factory.mktemp("exported") / "tiny"
    shutil.copytree(calibrated_bundle, path)
    # allow_mismatch: whether an INT8 export passes parity is the CPU's to decide (its instruction set
    # changes INT8 results); the tests below assert what holds on any CPU.
    with logged() as lines:
        records = export_bundle(path, "all", "all", allow_mismatch=True)
    return path, records, lines


def _detector(bundle_path: Path, backend: str, precision: str | None = None) -> DiffusionDetector:
    b = Bundle.load(bundle_path)
    cal = b.manifest.calibration
    with np.load(b.file(CALIBRATION_FILE)) as z:
        stats = Stats(z["mean"], z["std"])
    engine = make_engine(b, backend, "cpu", precision=precision)
    return DiffusionDetector(engine, b.manifest.preprocess, stats, cal.threshold, cal.pixel_threshold)


def test_every_format_and_precision_exports_and_passes_parity(exported):
    path, records, lines = exported
    assert set(records) == EXPECTED
    b = Bundle.load(path)  # every new file is listed with its sha256 and verifies
    assert set(b.manifest.exports) == EXPECTED
    for name, rec in b.manifest.exports.items():
        assert rec.sampler == "teacher" and rec.inputs == ["frames", "mean", "std"]
        assert all(b.has(f) for f in rec.files)
        par = rec.parity
        assert par["passed"] == (par["score_rank_correlation"] >= parity.MIN_RANK_CORRELATION), (name, par)
        if rec.precision == "int8":
            # 7-bit weights keep INT8 close to torch with and without VNNI (ONEDNN_MAX_CPU_ISA=AVX2 checks
            # the former on any CPU); how close is the CPU's, so the bounds leave room.
            assert par["map_correlation"] > 0.98 and par["score_rank_correlation"] > 0.95, (name, par)
            continue
        assert par["passed"] and par["map_correlation"] > 0.99, (name, par)
        if rec.precision == "fp32":
            assert par["max_abs_map_diff"] < 1e-3, (name, par)
        assert rec.int8_scope in (("denoiser", "rebuild") if rec.precision == "int8" else (None,))
    assert any("score rank corr" in line for line in lines)
    assert not list(path.glob(".export-*"))  # the work folder is gone


def test_int8_keeps_the_feature_pass_in_float_when_quantizing_it_fails_parity(calibrated_bundle, tmp_path,
                                                                             monkeypatch):
    from diffinspect.export import api, export_bundle, parity

    attempts: list[int] = []
    real_build = api._build

    def build(fmt, precision, work, src, nodes, *args):
        attempts.append(len(nodes["int8"]))
        return real_build(fmt, precision, work, src, nodes, *args)

    # Parity fails whenever the int8 node set is the larger (rebuild + feature pass) one.
    monkeypatch.setattr(api, "_build", build)
    monkeypatch.setattr(parity, "passes", lambda figures: len(attempts) > 1 and attempts[-1] < attempts[0])
    path = tmp_path / "b"
    shutil.copytree(calibrated_bundle, path)
    from logged import logged

    with logged() as lines:  # a handler on diffinspect's own logger, whatever other libraries do to the root's
        records = export_bundle(path, "openvino", "int8")
    assert len(attempts) == 2 and attempts[1] < attempts[0], attempts
    rec = records["openvino/model.int8.xml"]
    assert rec.int8_scope == "rebuild" and rec.parity["passed"]
    assert any("keeping it in float" in line for line in lines), lines


def test_exported_backends_label_like_torch(exported, line_dir):
    path, _, _ = exported
    test = labelled_set(line_dir)
    ref = _detector(path, "torch")
    frames = [read_image(s.path, ref.preprocess.color) for s in test.samples]
    ref_scores = ref.score(frames).scores
    # The calibration images are among the good test images: one of them scores exactly the threshold,
    # where a 1e-5 difference flips the label. fp32 must agree everywhere else.
    clear = np.abs(ref_scores - ref.threshold) > 1e-3
    for backend, precision, min_agreement in (("onnxruntime", "fp32", 1.0), ("openvino", "fp32", 1.0),
                                              ("openvino", "int8", 0.9), ("onnxruntime", "int8", 0.9)):
        det = _detector(path, backend, precision)
        assert det.backend.startswith(f"{backend}:")
        agree = (det.score(frames).scores > det.threshold) == (ref_scores > ref.threshold)
        assert np.mean(agree[clear]) >= min_agreement, (backend, precision)


def test_auto_picks_the_fastest_export_that_passes_its_self_check(exported, monkeypatch, caplog):
    path, _, _ = exported
    with caplog.at_level("DEBUG", logger="diffinspect"):
        engine = make_engine(Bundle.load(path), "auto")
    lines = caplog.messages
    assert engine.name == "openvino:CPU" and "max score deviation" in engine.selection
    # INT8 is the fastest here; whether it meets the self-check tolerance depends on the CPU's INT8 kernels.
    if engine.precision == "int8":
        assert lines and "openvino:CPU (int8)" in lines[0]
    else:
        assert "openvino:CPU:int8 failed self-check" in engine.selection
    # A tolerance no INT8 model meets: auto falls through to the fp32 IR and says why.
    monkeypatch.setattr(autoselect, "SELFCHECK_TOLERANCE", 0.0)
    engine = make_engine(Bundle.load(path), "auto")
    assert engine.name == "openvino:CPU" and engine.precision == "fp32"
    assert "openvino:CPU:int8 failed self-check" in engine.selection


def test_export_writes_a_new_version_of_the_bundle(exported):
    path, records, _ = exported
    b = Bundle.load(path)
    parent = Bundle.load(path, version=b.manifest.version.parent)
    assert b.manifest.version.command == "export" and set(b.manifest.exports) == set(records)
    assert parent.manifest.exports == {} and parent.manifest.calibration == b.manifest.calibration
    assert os.path.samefile(b.file("weights.pt"), parent.file("weights.pt"))


def test_tampered_model_is_refused(exported, tmp_path):
    path, _, _ = exported
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    model = Bundle.load(copy, verify=False).folder / "model.onnx"  # the active version's file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(DiffinspectError, match=r"model\.onnx .*sha256"):
        make_engine(Bundle.load(copy), "onnxruntime")


def test_missing_export_unknown_device_and_backend_are_clear(exported, calibrated_bundle):
    with pytest.raises(DiffinspectError, match="inspect export"):
        make_engine(Bundle.load(calibrated_bundle), "openvino")
    b = Bundle.load(exported[0])
    with pytest.raises(DiffinspectError, match="devices present: CPU"):
        make_engine(b, "openvino", "FPGA")
    with pytest.raises(DiffinspectError, match="providers present: .*CPUExecutionProvider"):
        make_engine(b, "onnxruntime", "no-such-accelerator")
    with pytest.raises(DiffinspectError, match="auto, torch, onnxruntime, openvino"):
        make_engine(b, "tensorflow")
    with pytest.raises(DiffinspectError, match="no fp16 ONNX"):
        from diffinspect.export import export_bundle

        export_bundle(exported[0], "onnx", "fp16")


def test_exports_of_another_recipe_are_stale(exported, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported[0], copy)
    folder = Bundle.load(copy, verify=False).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["score"]["top_k"] = 0.05  # baked into the graph: the exports no longer compute this recipe
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffinspectError, match="stale"):
        make_engine(Bundle.load(copy), "openvino")


def test_export_needs_a_calibrated_bundle(trained_bundle):
    from diffinspect.export import export_bundle

    with pytest.raises(DiffinspectError, match="run inspect calibrate first"):
        export_bundle(trained_bundle, "onnx")


def test_parity_failure_refuses_and_writes_nothing(exported, calibrated_bundle, tmp_path, monkeypatch):
    from diffinspect.export import export_bundle, onnx_graph, parity

    copy = tmp_path / "b"
    shutil.copytree(calibrated_bundle, copy)
    folder = Bundle.load(copy).folder
    before = (folder / "manifest.json").read_text()
    # Reuse the fixture's graph instead of a second torch export; demand more than any export gives.
    monkeypatch.setattr(onnx_graph, "export_onnx",
                        lambda graph, example, dst: shutil.copyfile(Bundle.load(exported[0]).file("model.onnx"), dst))
    monkeypatch.setattr(parity, "MIN_RANK_CORRELATION", 1.01)
    with pytest.raises(DiffinspectError, match="export refused, nothing written"):
        export_bundle(copy, "onnx", "fp32")
    assert Bundle.load(copy).folder == folder and (folder / "manifest.json").read_text() == before
    assert not list(copy.rglob("model.onnx")) and not list(copy.glob(".export-*"))
    assert not list((copy / "versions").glob(".*"))  # no version left half-written


def _edge_cli(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """`python -m diffinspect ARGS` where importing torch fails, as on the base install."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text(TORCH_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "diffinspect", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_edge_install_scores_and_recalibrates_without_torch(exported, line_dir, tmp_path):
    path, _, _ = exported
    images = line_dir / "test" / "scratch"
    for backend in ("onnxruntime", "openvino"):
        res = _edge_cli(tmp_path, "score", path, images, "--json", "--backend", backend)
        assert res.returncode == 0, res.stderr[-2000:]
        records = [json.loads(line) for line in res.stdout.splitlines()]
        assert len(records) == len(list(images.iterdir()))
        assert all(r["label"] in ("ok", "ng") and r["backend"].startswith(f"{backend}:") for r in records)
    # Calibration statistics are graph inputs: re-calibrating an exported bundle needs no torch and no
    # re-export, and auto then runs an export.
    copy = tmp_path / "recal"
    shutil.copytree(path, copy)
    res = _edge_cli(tmp_path, "calibrate", copy, line_dir / "test" / "good", "--false-reject-rate", "0.1",
                    "--backend", "onnxruntime")
    assert res.returncode == 0, res.stderr[-2000:]
    cal = Bundle.load(copy).manifest.calibration
    assert cal.backend == "onnxruntime:CPUExecutionProvider" and cal.n == 24
    res = _edge_cli(tmp_path, "score", copy, images / "000.png", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["backend"] == "openvino:CPU", res.stderr[-2000:]
    assert "fastest passing candidate" in res.stderr
    res = _edge_cli(tmp_path, "info", copy)
    assert res.returncode == 0 and "openvino/model.int8.xml" in res.stdout and "CPUExecutionProvider" in res.stdout
    res = _edge_cli(tmp_path, "export", copy)
    assert res.returncode == 2 and "needs torch" in res.stderr and "Traceback" not in res.stderr
