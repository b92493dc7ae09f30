"""The scoring graph as one ONNX model, and which of its nodes may be quantized.

The dynamo exporter tags every node with the torch module scopes it came from. The scoring graph
calls its denoiser twice over: `denoiser(x_t, t)` for the rebuild (scope "denoiser") and
`denoiser.features(...)` on x and its rebuild, as one batch (scopes "denoiser.enc..."). INT8 covers
both (`int8_nodes`), or the rebuild only (`rebuild_nodes`) where that fails parity; FLOAT_MODULES, the
error arithmetic, blur and top-k always stay float.

Why the feature pass may be quantized: its term is the distance between two nearly equal feature maps,
and when x and its rebuild went through separate graph nodes, each with its own INT8 quantizers, the
rounding differed between them and swamped the distance on images with defects. As one batch they
share every quantizer, so equal inputs round alike, and quantizing both passes is faster than the rebuild
alone at a negligible cost in AUROC (bench/backends.py; README). On very small models the parity check
can still fail, hence the fallback to the rebuild only.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx

from diffinspect import DiffinspectError

log = logging.getLogger(__name__)

INPUT_NAMES = ["frames", "mean", "std"]
OUTPUT_NAMES = ["map", "score", "raw"]
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
# Layers kept in float: the first and last layers (image in, ε out: their error
# goes straight into the rebuilt image) and the time-conditioning MLPs (tiny, and they modulate
# every block).
FLOAT_MODULES = {"conv_in", "conv_out", "patch_embed", "final", "time_embed", "temb", "ada"}
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def export_onnx(graph, example: tuple, path: Path) -> None:
    """Export `graph(frames, mean, std)` with a dynamic batch dimension to one self-contained file."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter prints its progress; keep it for the error message only
    # it also warns that torchvision's operators cannot be registered: the graph uses none of them
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export
            torch.onnx.export(graph, example, str(path), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                              dynamic_shapes={"frames": {0: batch}, "mean": None, "std": None},
                              dynamo=True, external_data=False, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; the user needs one line and the log
        tail = chatter.getvalue().strip().splitlines()[-3:]
        raise DiffinspectError(f"ONNX export failed: {exc.__class__.__name__}: {str(exc)[:300]} "
                               f"{' | '.join(tail)}") from None
    log.info(f"exported the scoring graph to ONNX ({path.stat().st_size / 1e6:.1f} MB)")


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return []
    return []


def _tagged(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[str]]]:
    nodes = [(n, _scopes(n)) for n in model.graph.node]
    if not any(scopes for _, scopes in nodes):
        raise DiffinspectError("the ONNX graph carries no torch module scopes, so the denoiser cannot be told "
                               "from the error arithmetic (did the torch exporter change?)")
    return nodes


def int8_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes of the denoiser (rebuild and feature pass), minus FLOAT_MODULES."""
    names = []
    for node, scopes in _tagged(model):
        modules = {p for s in scopes for p in s.split(".")}
        if node.op_type in QUANTIZABLE_OPS and any(s.startswith("denoiser") for s in scopes) \
                and not modules & FLOAT_MODULES:
            names.append(node.name)
    return names


def rebuild_nodes(model: onnx.ModelProto) -> list[str]:
    """int8_nodes of the rebuild passes only (scope "denoiser" itself): the feature pass stays float."""
    rebuild = {node.name for node, scopes in _tagged(model) if "denoiser" in scopes}
    return [name for name in int8_nodes(model) if name in rebuild]


def denoiser_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of every Conv/MatMul/Gemm node of the denoiser (rebuild and feature pass)."""
    return [node.name for node, scopes in _tagged(model)
            if node.op_type in QUANTIZABLE_OPS and any(s.startswith("denoiser") for s in scopes)]


def splice_backbone(path: Path, backbone: Path) -> None:
    """Put the user's ONNX feature model into the exported scoring graph at `path`, in place of the
    placeholder node it exported as (models/backbone.OnnxFeatures): one graph, so every engine runs the
    same one scoring path with the same inputs and outputs. The backbone is brought to the graph's opset,
    its names prefixed so none collides with the graph's."""
    from onnx import compose, helper, version_converter

    from diffinspect.models.backbone import PLACEHOLDER

    model, user = onnx.load(str(path)), onnx.load(str(backbone))
    domain, op = PLACEHOLDER.split("::")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if next((o.version for o in user.opset_import if o.domain in ("", "ai.onnx")), opset) != opset:
        try:
            user = version_converter.convert_version(user, opset)
        except Exception as exc:  # the converter raises its own types
            raise DiffinspectError(f"the backbone's ONNX opset cannot be brought to the graph's {opset}: "
                                   f"{str(exc)[:200]}") from None
    user = compose.add_prefix(user, "backbone/")
    weights = {t.name for t in user.graph.initializer}
    (image,) = [i.name for i in user.graph.input if i.name not in weights]
    graph = model.graph
    at = next(i for i, n in enumerate(graph.node) if n.domain == domain and n.op_type == op)
    node = graph.node[at]
    nodes = [helper.make_node("Identity", [node.input[0]], [image]), *user.graph.node,
             *(helper.make_node("Identity", [o.name], [mine])
               for o, mine in zip(user.graph.output, node.output, strict=True))]
    del graph.node[at]
    for i, new in enumerate(nodes):
        graph.node.insert(at + i, new)
    graph.initializer.extend(user.graph.initializer)
    model.functions.extend(user.functions)
    imports = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in user.opset_import if o.domain not in imports | {"ai.onnx"})
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    onnx.save(model, str(path))
