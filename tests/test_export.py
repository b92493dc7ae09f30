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
from diffinspect.engines import select as autoselect
from diffinspect.engines.exports import CACHE_ENV
from diffinspect.engines.select import make_engine
from diffinspect.export import parity
from diffinspect.scoring.diffusion import DiffusionDetector
from diffinspect.scoring.loader import load_detector

EXPECTED = {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.fp16.xml",
            "openvino/model.int8.xml"}
INT8_FLIPS = 2  # verdicts an INT8 export may flip against torch on 44 fresh frames of the synthetic line
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
    """The bundle's calibrated detector (frame term and threshold included) on one engine and precision."""
    det = load_detector(bundle_path, backend="torch")
    if backend != "torch":
        det.engine = make_engine(Bundle.load(bundle_path), backend, "cpu", precision=precision)
        det.backend = det.engine.name
    return det


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


def test_int8_of_the_patch_term_keeps_map_parity(calibrated_bundle, line_dir, tmp_path):
    """With the patch term on, both INT8 exports keep the encoder pass float (the term whitens the frame's
    own features, which would amplify INT8 rounding), so the map matches torch's like any other export."""
    from dataclasses import replace

    from diffinspect.export import export_bundle
    from diffinspect.scoring.calibrate import calibrate

    path = tmp_path / "b"
    shutil.copytree(calibrated_bundle, path)
    with Bundle.load(path).updating() as up:
        up.manifest.score = replace(up.manifest.score, patch_weight=1.0)
    calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, backend="torch")
    records = export_bundle(path, "all", "int8", allow_mismatch=True)
    assert set(records) == {"model.int8.onnx", "openvino/model.int8.xml"}
    for name, rec in records.items():
        assert rec.terms[-1] == "patch" and rec.int8_scope == "rebuild", (name, rec.terms, rec.int8_scope)
        assert rec.parity["map_correlation"] > 0.98 and rec.parity["passed"], (name, rec.parity)


def test_exported_backends_label_like_torch(exported):
    """Each export gives the verdicts torch gives, judged as the product is: the fused score (diffusion and
    frame term, the bundle's own rule) against the bundle's own threshold, on fresh frames (a calibration
    image ties with its own calibration score, where a 1e-6 difference moves its rank). fp32 agrees on
    every frame; INT8 may flip at most INT8_FLIPS."""
    from diffinspect.data.synthetic import DEFECTS, render_frame

    path, _, _ = exported
    ref = _detector(path, "torch")
    assert ref.frame_term is not None  # the fused score, whose threshold the manifest holds
    rng = np.random.default_rng(11)
    frames = [render_frame("metal", rng, 64, None if i < 24 else DEFECTS[i % len(DEFECTS)])[0] for i in range(44)]
    ref_ng = ref.score(frames).scores > ref.threshold
    assert 0 < ref_ng.sum() < len(frames)
    for backend, precision, flips in (("onnxruntime", "fp32", 0), ("openvino", "fp32", 0),
                                      ("openvino", "int8", INT8_FLIPS), ("onnxruntime", "int8", INT8_FLIPS)):
        det = _detector(path, backend, precision)
        assert det.backend.startswith(f"{backend}:") and det.threshold == ref.threshold
        flipped = int(np.sum((det.score(frames).scores > det.threshold) != ref_ng))
        assert flipped <= flips, (backend, precision, flipped)


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


def test_onnx_int8_leaves_the_float_nodes_their_float_weights(tmp_path):
    """Two convolutions read one weight (on their own inputs), as the rebuild and the feature pass read the
    denoiser's; only the first is quantized. onnxruntime's quantizer would hand the second the INT8 weight
    too: it must keep computing exactly in float."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader

    from diffinspect.export.quantize import _quantize_static, unshare_weights

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["q_out"], name="quantized", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["y", "w"], ["f_out"], name="float", pads=[1, 1, 1, 1])],
        "shared", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("x", "y")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8, 8]) for n in ("q_out", "f_out")], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert unshare_weights(model, {"quantized"}) == 1
    assert [n.input[1] for n in model.graph.node] == ["w", "w.float"]
    src, dst = tmp_path / "shared.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(src))
    frames = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": f, "y": f} for f in frames])

        def get_next(self):
            return next(self.feeds, None)

    _quantize_static(str(src), str(dst), Reader(), ["quantized"])
    feed = {"x": frames[0], "y": frames[0]}
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)[1]
    q_out, f_out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(f_out, reference, rtol=1e-5, atol=1e-5)  # float stays float
    assert np.abs(q_out - reference).max() > 1e-3  # while the quantized node did quantize
