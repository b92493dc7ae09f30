"""A pretrained backbone the user supplies (`inspect train --backbone FILE`): a torchvision-layout ResNet
state dict or an ONNX feature model, feeding the patch term. No pretrained weights exist on this machine:
every backbone here is randomly initialised and saved by the test, so these tests guard the mechanics
(loading, the patch term on its features, export parity, the torch-free runtime), not its accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hardening import run_cli

from diffinspect.bundle import Bundle
from diffinspect.data.synthetic import render_frame
from diffinspect.models import build_model
from diffinspect.models.backbone import ResNetTrunk, _recognise, build_backbone, default_input, read_backbone
from diffinspect.models.patches import BACKBONE_GRID, PatchGaussian
from diffinspect.models.recipe import Backbone, Recipe
from diffinspect.models.schedule import NoiseSchedule
from diffinspect.models.scoring import ScoringGraph
from diffinspect.train.patches import fit_patch_statistics
from diffinspect.vocab import BackboneKind

SIZE = 32  # model input of the tests
INPUT = 64  # the backbone's input: layer2 at 8 x 8, layer3 at 4 x 4


def _resnet18(path: Path, seed: int = 0) -> Path:
    """A randomly initialised resnet18 in torchvision's layout (layer4 and fc included, as torchvision saves)."""
    torch.manual_seed(seed)
    state = ResNetTrunk("resnet18").state_dict()
    state |= {"layer4.0.conv1.weight": torch.randn(512, 256, 3, 3), "fc.weight": torch.randn(1000, 512)}
    torch.save(state, path)
    return path


def _onnx(net: torch.nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool = True) -> Path:
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    torch.onnx.export(net.eval(), (example,), str(path), input_names=["image"], dynamic_shapes=dims, dynamo=True,
                      external_data=False, verbose=False)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same random resnet18 as a state dict and as an ONNX feature model (layer2, layer3 out)."""
    root = tmp_path_factory.mktemp("backbones")
    pt = _resnet18(root / "resnet18.pth")
    trunk = ResNetTrunk("resnet18")
    trunk.load_state_dict({k: v for k, v in torch.load(pt).items() if k.split(".")[0] != "layer4" and k != "fc.weight"})
    return {"pt": pt, "onnx": _onnx(trunk, root / "features.onnx", torch.zeros(2, 3, INPUT, INPUT))}


def _loaded(src: Path, tmp: Path) -> tuple[Backbone, torch.nn.Module]:
    spec, data = read_backbone(Backbone(file=str(src), input_size=INPUT), SIZE)
    (tmp / str(spec.file)).write_bytes(data)
    return spec, build_backbone(spec, tmp / str(spec.file))


def test_both_kinds_load_and_compute_the_same_features(files, tmp_path):
    spec_pt, pt = _loaded(files["pt"], tmp_path)
    spec_onnx, onnx = _loaded(files["onnx"], tmp_path)
    assert (spec_pt.kind, spec_pt.file, spec_pt.input_size) == (BackboneKind.RESNET18, "backbone.pt", INPUT)
    assert (spec_onnx.kind, spec_onnx.file) == (BackboneKind.ONNX, "backbone.onnx")
    assert spec_pt.mean == [0.485, 0.456, 0.406] and spec_pt.std == [0.229, 0.224, 0.225]  # ImageNet's
    x = torch.rand(3, 1, SIZE, SIZE) * 2 - 1  # gray frames are repeated to RGB
    with torch.no_grad():
        a, b = pt(x), onnx(x)
    assert [tuple(f.shape) for f in a] == [(3, 128, 8, 8), (3, 256, 4, 4)]
    for fa, fb in zip(a, b, strict=True):
        assert torch.allclose(fa, fb, atol=1e-4) and fa.std() > 0.01
    # only what the patch term reads is kept: layer4 and fc are not copied into the bundle
    assert not any(k.startswith(("layer4", "fc")) for k in torch.load(tmp_path / "backbone.pt"))


def test_every_named_resnet_is_recognised_from_its_keys_and_shapes():
    for kind in ("resnet18", "resnet34", "resnet50", "wide_resnet50_2"):
        state = ResNetTrunk(kind).state_dict()
        assert _recognise(Path(kind), state) == kind
    # unset, the input keeps the model input's aspect ratio at ImageNet's 224 px short side
    assert default_input(64) == (224, 224) and default_input((64, 160)) == (224, 560)


def test_the_config_table_sets_the_backbone_and_refuses_bad_values(tmp_path):
    from diffinspect import DiffinspectError
    from diffinspect.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text("[score.backbone]\ninput_size = [96, 128]\nmean = [0.5, 0.5, 0.5]\n")
    b = load_config(cfg, {"score.backbone.file": "r.pt"}).score.backbone
    assert (b.file, b.input_size, b.mean, b.std) == ("r.pt", [96, 128], [0.5] * 3, [0.229, 0.224, 0.225])
    assert load_config().score.backbone is None
    for bad in ("std = [0.2, 0.0, 0.2]", "input_size = 8", "mean = [0.5]"):
        cfg.write_text(f"[score.backbone]\n{bad}\n")
        with pytest.raises(DiffinspectError, match="config key score.backbone"):
            load_config(cfg)


def _frames(n: int, seed: int, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [render_frame("metal", rng, SIZE, defect) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] > 0 for p in pairs])


def _graph(backbone: torch.nn.Module, good: np.ndarray, patch_weight: float) -> ScoringGraph:
    torch.manual_seed(0)
    denoiser = build_model("unet", "tiny", SIZE, 3).eval()
    patches = PatchGaussian.from_arrays(fit_patch_statistics(denoiser, good, backbone=backbone), BACKBONE_GRID)
    return ScoringGraph(denoiser, NoiseSchedule("linear"), Recipe(patch_weight=patch_weight), patches=patches,
                        backbone=backbone)


def test_the_patch_term_reads_the_backbone_and_is_flat_without_it(files, tmp_path):
    """On a random backbone's features the patch term marks pasted defects and changes the map; zeroed
    weights leave every patch alike, so the term is flat."""
    _, backbone = _loaded(files["pt"], tmp_path)
    good, _ = _frames(48, 0)
    bad, masks = _frames(12, 2, "spot")
    graph = _graph(backbone, good, 1.0)
    assert graph.term_names == ["pixel", "ssim", "feature", "patch"]
    with torch.no_grad():
        raw = graph.raw_terms(torch.from_numpy(bad)).numpy()
        ones, zeros = torch.ones(4, SIZE, SIZE), torch.zeros(4, SIZE, SIZE)
        with_patch = graph.combine(torch.from_numpy(raw), zeros, ones)
        without = _graph(backbone, good, 0.0).combine(torch.from_numpy(raw[:, :3]), zeros[:3], ones[:3])
    patch = raw[:, 3]
    assert np.mean([p[m].mean() > p[~m].mean() for p, m in zip(patch, masks, strict=True)]) > 0.8
    assert (with_patch - without).abs().mean() > 0.1
    with torch.no_grad():
        for p in backbone.parameters():
            p.zero_()
        flat = _graph(backbone, good, 1.0).raw_terms(torch.from_numpy(bad))[:, 3].numpy()
    assert flat.std() < 1e-6 * max(1.0, abs(flat.mean()))


# --- refused files: one line, exit 2, before any training -----------------------------------------------


def _onnx_graph(path: Path, input_shape: list, output_rank: int = 4) -> Path:
    """A one-node ONNX model (a 1 x 1 convolution, or a flatten for a non-image output)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = input_shape[1] if len(input_shape) == 4 and isinstance(input_shape[1], int) else 3
    if len(input_shape) == 4:
        weight = numpy_helper.from_array(np.ones((8, channels, 1, 1), np.float32), "w")
        nodes = [helper.make_node("Conv", ["image", "w"], ["f"])]
        if output_rank == 2:
            nodes.append(helper.make_node("Flatten", ["f"], ["g"]))
    else:
        weight = numpy_helper.from_array(np.ones((input_shape[1], 8), np.float32), "w")
        nodes = [helper.make_node("MatMul", ["image", "w"], ["f"])]
    out = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_bad_backbone_files_are_refused_in_one_line(capsys, files, line_dir, tmp_path):
    pt = torch.load(files["pt"])
    short = tmp_path / "short.pt"  # a resnet18 missing a block of layer3: no ResNet diffinspect knows
    torch.save({k: v for k, v in pt.items() if not k.startswith("layer3.1.")}, short)
    gray = tmp_path / "gray.pt"
    torch.save(pt | {"conv1.weight": pt["conv1.weight"][:, :1]}, gray)
    misfit = tmp_path / "misfit.pt"  # the right keys, a wrong shape
    torch.save(pt | {"layer2.0.conv2.weight": torch.zeros(128, 128, 5, 5)}, misfit)
    odd = tmp_path / "odd.pt"
    torch.save({"weight": torch.zeros(3)}, odd)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    tiles = tmp_path / "tiles.toml"
    tiles.write_text('[data]\nfeed = "tiles"\n')
    out = tmp_path / "out"
    cases = {
        "not found": (tmp_path / "missing.pt",),
        "not a torch state dict": (text,),
        "not a recognised ResNet": (short,),
        "no conv1.weight": (odd,),
        "does not fit a resnet18": (misfit,),
        "1-channel images": (gray,),
        "has no image input": (_onnx_graph(tmp_path / "vector.onnx", ["n", 10]),),
        "4-channel images": (_onnx_graph(tmp_path / "rgba.onnx", ["n", 4, 32, 32]),),
        "batches of exactly 1": (_onnx_graph(tmp_path / "one.onnx", [1, 3, 32, 32]),),
        "not a feature map": (_onnx_graph(tmp_path / "flat.onnx", ["n", 3, 32, 32], output_rank=2),),
        "tiles": (files["pt"], "--config", tiles),
    }
    for expected, (path, *more) in cases.items():
        code, _, err = run_cli(capsys, "train", line_dir, "--out", out, "--steps", "1", "--backbone", path, *more)
        assert code == 2 and expected in err, (expected, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


# --- a bundle with a backbone: training, export, the torch-free runtime (slow: they train) ----------------


@pytest.fixture(scope="module")
def bundles(files, line_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny calibrated bundle per kind of backbone, trained a few steps (the denoiser is not the point)."""
    from diffinspect.config import load_config
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.train import train

    out = {}
    for kind, src in files.items():
        path = tmp_path_factory.mktemp("backbone-bundles") / kind
        cfg = load_config(overrides={"model.size": "tiny", "data.image_size": SIZE, "train.steps": 10,
                                     "train.batch_size": 8, "data.holdout": 0.3, "score.backbone.file": str(src),
                                     "score.backbone.input_size": INPUT})
        train(line_dir, path, cfg)
        calibrate(path, line_dir / "test" / "good", false_reject_rate=0.1, backend="torch")
        out[kind] = path
    return out


@pytest.mark.slow
def test_a_bundle_holds_and_checks_its_backbone(bundles, tmp_path):
    from diffinspect.models.from_bundle import load_patches

    for kind, path in bundles.items():
        b = Bundle.load(path)
        spec = b.recipe.backbone
        assert spec is not None and b.has(str(spec.file)) and b.recipe.patch_weight == 1.0
        assert spec.kind == ("onnx" if kind == "onnx" else "resnet18") and spec.input_size == INPUT
        assert b.manifest.calibration.terms == ["pixel", "ssim", "feature", "patch"]
        # the statistics belong to the backbone's features: a distilled student's graph keeps them
        assert load_patches(b, "student.pt").grid == BACKBONE_GRID
    copy = tmp_path / "copy"
    shutil.copytree(bundles["pt"], copy)
    folder = Bundle.load(copy).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["score"]["backbone"]["std"] = [0.2, 0.0, 0.2]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="score.backbone.std must be 3 numbers"):
        Bundle.load(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundles["pt"], copy)
    with open(Bundle.load(copy).folder / "backbone.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(Exception, match="backbone.pt .* was altered"):
        Bundle.load(copy)


@pytest.mark.slow
def test_exports_with_a_backbone_match_torch(bundles, line_dir, tmp_path):
    """The state dict is part of the exported graph, the ONNX model is spliced into it: every export's map
    follows torch's (INT8 keeps both the backbone and the encoder pass float)."""
    from diffinspect.export import export_bundle

    few = tmp_path / "good"  # INT8 ranges and parity on 12 frames (and their defect copies): quick
    few.mkdir()
    for path in sorted((line_dir / "test" / "good").iterdir())[:12]:
        shutil.copy(path, few)
    records = export_bundle(bundles["pt"], "all", "all", calibration_dir=few, allow_mismatch=True)
    records |= {f"onnx backbone: {k}": v for k, v in export_bundle(bundles["onnx"], "all", "fp32", few).items()}
    assert len(records) == 7
    for name, rec in records.items():
        assert rec.terms[-1] == "patch", (name, rec.terms)
        bar = 0.98 if rec.precision == "int8" else 0.99
        assert rec.parity["map_correlation"] > bar and rec.parity["passed"], (name, rec.parity)
    assert Bundle.load(bundles["onnx"]).manifest.exports["model.onnx"].parity["max_abs_map_diff"] < 1e-2
    # the ResNet's convolutions are in the graph, and none is among those INT8 or fp16 may touch
    import onnx

    from diffinspect.export.onnx_graph import _tagged, denoiser_nodes

    proto = onnx.load(str(Bundle.load(bundles["pt"]).file("model.onnx")))
    convs = {n.name for n, scopes in _tagged(proto) if n.op_type == "Conv" and any(
        s.startswith("backbone") for s in scopes)}
    assert len(convs) > 10 and not convs & set(denoiser_nodes(proto))


def _edge_cli(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """`python -m diffinspect ARGS` where importing torch fails, as on the base install."""
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text('raise ImportError("no torch on this edge box (test blocker)")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "diffinspect", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_the_torch_free_runtime_scores_a_bundle_with_a_backbone(bundles, line_dir, tmp_path):
    images = line_dir / "test" / "scratch"
    for kind, path in bundles.items():
        if not Bundle.load(path).manifest.exports:
            pytest.skip("needs the exports of test_exports_with_a_backbone_match_torch")
        for backend in ("onnxruntime", "openvino"):
            res = _edge_cli(tmp_path, "score", path, images, "--json", "--backend", backend)
            assert res.returncode == 0, (kind, res.stderr[-2000:])
            records = [json.loads(line) for line in res.stdout.splitlines()]
            assert len(records) == len(list(images.iterdir())), kind
            assert all(r["label"] in ("ok", "ng") and r["backend"].startswith(f"{backend}:") for r in records)
