"""INT8 and fp16 variants of the exported scoring graph: onnxruntime QDQ and OpenVINO IR (+ NNCF).

Both INT8 paths quantize the same nodes (`onnx_graph.int8_nodes`) on the same calibration frames.
Traps measured on this stack (see DESIGN.md): OpenVINO computes Conv on signed-int8 activations
wrongly, so activations are unsigned; `quantize_static` fails on shared norm constants unless only
Conv/MatMul/Gemm are quantizable; `quant_pre_process` is skipped: it needs a workaround to pass shape
inference, its graph optimization may fuse or rename the nodes selected by name, and the dynamo
exporter already ran shape inference and its own optimizer.

Weights are quantized to 7 bits (onnxruntime `reduce_range`, NNCF `OverflowFix.ENABLE`) so INT8 scores
do not depend on the CPU: without VNNI (AVX2, and AVX-512 before VNNI) a u8 x s8 convolution sums pairs
of products in saturating 16-bit registers, and 255 x 127 x 2 overflows them where 255 x 63 x 2 cannot.
With full 8-bit weights the same export ranked scores visibly worse on an AVX2 CPU than on an AVX-512
VNNI one; `ONEDNN_MAX_CPU_ISA=AVX2` reproduces the AVX2 behaviour on the latter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from diffinspect.export.onnx_graph import INPUT_NAMES, QUANTIZABLE_OPS


def _feeds(frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One frame per calibration step: the ORT calibrator stacks steps and needs equal batch sizes."""
    return [dict(zip(INPUT_NAMES, (frames[i:i + 1], mean, std), strict=True)) for i in range(len(frames))]


def onnx_int8(src: Path, dst: Path, nodes: list[str], frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(_feeds(frames, mean, std))

        def get_next(self):
            return next(self.feeds, None)

    model = onnx.load(str(src))
    unshared = dst.with_name(dst.name + ".unshared.onnx")
    if unshare_weights(model, set(nodes)):
        onnx.save(model, str(unshared))
        src = unshared
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run quant_pre_process does not apply (see above)
    try:
        _quantize_static(str(src), str(dst), Reader(), nodes)
    finally:
        root.setLevel(level)
        unshared.unlink(missing_ok=True)


def unshare_weights(model, nodes: set[str]) -> int:
    """Give the nodes that stay float their own copy of every initializer they share with a node in
    `nodes`; returns the number of copies. The rebuild and the feature pass run the same denoiser, so
    its weights are initializers both read, and onnxruntime's QDQ quantizer rewires every reader of a
    quantized initializer to its INT8 copy: the feature pass, kept float by name, computed with INT8
    weights, which the patch term's whitening amplifies past the map parity bar (OpenVINO's NNCF
    quantizes per node and needs no copies)."""
    import onnx

    quantized = {name for node in model.graph.node if node.name in nodes for name in node.input}
    initializers = {t.name: t for t in model.graph.initializer}
    copies: dict[str, str] = {}
    for node in model.graph.node:
        if node.name in nodes:
            continue
        for i, name in enumerate(node.input):
            if name not in quantized or name not in initializers:
                continue
            if name not in copies:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = copies[name] = f"{name}.float"
                model.graph.initializer.append(copy)
            node.input[i] = copies[name]
    return len(copies)


def _quantize_static(src: str, dst: str, reader, nodes: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        src, dst, reader, quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        reduce_range=True,  # 7-bit weights: no 16-bit saturation on CPUs without VNNI (see above)
        op_types_to_quantize=list(QUANTIZABLE_OPS), nodes_to_quantize=nodes,
        # Quantize what feeds a conv, not what leaves it: the residual adds and the ε output stay float
        # (as NNCF does), which ranks scores closer to torch's.
        extra_options={"OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS)},
    )


def openvino_ir(src: Path, xml: Path, fp16_nodes: list[str] | None = None) -> None:
    """fp32 IR, or with the weights of `fp16_nodes` stored as fp16 (then the compute precision is the
    device's: f32 on CPU, as the engine pins it, f16 on GPU).

    Not `compress_to_fp16`: it also rounds the Gaussian kernels of the blur, whose weights then no
    longer sum to 1, and SSIM's variance E[x²] - E[x]² cancels that error badly (maps and score ranks
    drift from torch's, where fp16 weights in the denoiser alone leave them as they were).
    """
    import openvino as ov

    model = ov.convert_model(str(src))
    if fp16_nodes is not None:
        _fp16_weights(model, set(fp16_nodes))
    ov.save_model(model, str(xml), compress_to_fp16=False)


def _fp16_weights(model, names: set[str]) -> None:
    import openvino as ov
    from openvino import opset13 as ops

    done: dict[int, object] = {}  # a weight shared by the rebuild and the feature passes: one copy
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "MatMul") or op.get_friendly_name().split("/")[0] not in names:
            continue
        for port in op.inputs():
            const = port.get_source_output().get_node()
            if const.get_type_name() != "Constant" or const.get_element_type() != ov.Type.f32:
                continue
            key = id(const)
            if key not in done:
                half = ops.constant(const.get_data().astype(np.float16))
                done[key] = ops.convert(half, ov.Type.f32)
            port.replace_source_output(done[key].output(0))


def openvino_int8(src: Path, xml: Path, nodes: list[str], frames: np.ndarray, mean: np.ndarray,
                  std: np.ndarray, transformer: bool) -> int:
    """NNCF post-training quantization of the IR; returns the number of FakeQuantize nodes."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    nncf.set_log_level(logging.WARNING)
    model = ov.convert_model(str(src))
    keep = set(nodes)
    ops = list(model.get_ordered_ops())
    # OpenVINO names each op after its ONNX node, a Conv/Gemm with a bias as "<name>/WithoutBiases".
    float_ops = [op.get_friendly_name() for op in ops
                 if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
                 and op.get_friendly_name().split("/")[0] not in keep]
    other_types = sorted({op.get_type_name() for op in ops} - {"Convolution", "MatMul"})
    quantized = nncf.quantize(
        model, nncf.Dataset(_feeds(frames, mean, std)), subset_size=len(frames),
        # Asymmetric activations: SiLU outputs are one-sided, and this is unsigned-int8 as above.
        preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
        ignored_scope=nncf.IgnoredScope(names=float_ops, types=other_types, validate=False),
        # 7-bit weights in every layer, not only the first (NNCF's default): see the module docstring.
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
    )
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
