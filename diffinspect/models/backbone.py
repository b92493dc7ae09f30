"""A pretrained backbone the user supplies (`inspect train --backbone FILE`) for the patch term.

Optional: diffinspect never needs one and never downloads one. FILE is either a torchvision-layout ResNet
state dict (resnet18, resnet34, resnet50 or wide_resnet50_2, recognised from its keys and shapes; the
network below is written here, torchvision is not a dependency) or an ONNX feature model (an image batch
in, one or more feature maps out). Its mid-level maps (ResNet layer2 and layer3, PatchCore's and
PaDiM's choice) take the place of the denoiser's encoder features in the patch term: the same
per-position Gaussian (models/patches.py), on the grid of the first map (layer2, 1/8 of its input).

Both kinds are part of the one exported scoring graph. A state dict is a torch module like the denoiser.
An ONNX model runs on onnxruntime in torch (fitting, the torch backend, the parity reference) and
exports as a placeholder node (PLACEHOLDER) that export/onnx_graph.splice_backbone replaces by the
model's own nodes, so every engine still runs one graph with the same inputs and outputs.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinspect import DiffinspectError
from diffinspect.data.image import ImageSize, input_hw, size_record
from diffinspect.models.recipe import Backbone
from diffinspect.vocab import BackboneKind

PLACEHOLDER = "diffinspect::backbone"  # domain::op of the node an ONNX backbone exports as
FILES = {"onnx": "backbone.onnx", "resnet": "backbone.pt"}  # its copy in the bundle
IMAGENET_SIDE = 224  # the short side pretrained ImageNet networks saw
LAYERS = ("conv1", "bn1", "layer1", "layer2", "layer3")  # what is kept of a ResNet: layer4 and fc are not used


def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, width_per_group: int = 64):
        super().__init__()
        self.conv1, self.bn1 = conv(cin, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride on the 3 x 3 convolution."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width_per_group: int = 64):
        super().__init__()
        width = planes * width_per_group // 64  # 128 per group: the wide ResNets
        self.conv1, self.bn1 = conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv(width, planes * self.expansion, 1), nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """downsample.0 (1 x 1 convolution) and downsample.1 (its norm), where the block changes shape."""
    return nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else None


# name: (block, blocks in layer1..layer3, width per group)
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int], int]] = {
    BackboneKind.RESNET18: (BasicBlock, (2, 2, 2), 64),
    BackboneKind.RESNET34: (BasicBlock, (3, 4, 6), 64),
    BackboneKind.RESNET50: (Bottleneck, (3, 4, 6), 64),
    BackboneKind.WIDE_RESNET50_2: (Bottleneck, (3, 4, 6), 128),
}


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to layer3, under torchvision's parameter names: x -> [layer2, layer3]."""

    def __init__(self, kind: str):
        super().__init__()
        block, blocks, width = ARCHS[kind]
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256), blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(block(cin, planes, stride if j == 0 else 1, width))
                cin = planes * block.expansion
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        l2 = self.layer2(self.layer1(x))
        return [l2, self.layer3(l2)]


class OnnxFeatures(nn.Module):
    """The user's ONNX feature model: onnxruntime when torch runs it, a placeholder node when exported."""

    def __init__(self, path: Path, hw: tuple[int, int]):
        super().__init__()
        self.path, self._session = str(path), None
        self.shapes = [o.shape[1:] for o in self._run(np.zeros((1, 3, *hw), np.float32))]  # (C, h, w) each

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        return self._session.run(None, {self._session.get_inputs()[0].name: x})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.onnx.is_in_onnx_export():
            n = x.shape[0]
            return list(torch.onnx.ops.symbolic_multi_out(
                PLACEHOLDER, (x,), {}, dtypes=[torch.float32] * len(self.shapes),
                shapes=[(n, *s) for s in self.shapes], version=1))
        return [torch.from_numpy(o).to(x.device) for o in self._run(x.detach().float().cpu().numpy())]

    def __getstate__(self) -> dict:  # copies (export works on one) open their own session
        return {**self.__dict__, "_session": None}


class BackboneFeatures(nn.Module):
    """x in [-1, 1] as the scoring graph holds it, (N, C, H, W) -> the backbone's feature maps: pixels to
    [0, 1], gray repeated to RGB, resized to the backbone's input, normalized (ImageNet's by default)."""

    def __init__(self, net: nn.Module, hw: tuple[int, int], mean: list[float], std: list[float]):
        super().__init__()
        self.net, self.hw = net.eval(), hw
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.hw:
            x = F.interpolate(x, size=self.hw, mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


def build_backbone(spec: Backbone, path: Path) -> BackboneFeatures:
    """The backbone a bundle records (`score.backbone`), from its file at `path`."""
    assert spec.kind is not None and spec.input_size is not None  # the manifest check refuses anything else
    hw = input_hw(spec.input_size)
    if spec.kind == BackboneKind.ONNX:
        net: nn.Module = OnnxFeatures(path, hw)
    else:
        net = ResNetTrunk(spec.kind)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return BackboneFeatures(net, hw, spec.mean, spec.std).eval()


def read_backbone(spec: Backbone, image_size: ImageSize) -> tuple[Backbone, bytes]:
    """The user's backbone file (spec.file) checked: (the spec as the bundle records it, the bytes of its copy
    in the bundle). Anything that is not a recognised ResNet or a usable ONNX feature model is one error."""
    path = Path(str(spec.file))
    if not path.is_file():
        raise DiffinspectError(f"backbone file not found: {path}")
    if path.suffix.lower() == ".onnx":
        kind, size, data = BackboneKind.ONNX, *_read_onnx(path, spec.input_size, image_size)
    else:
        kind, data = _read_state_dict(path)
        size = spec.input_size or default_input(image_size)
    if spec.kind is not None and spec.kind != kind:
        raise DiffinspectError(f"backbone {path} is a {kind}, not the {spec.kind} the config names")
    name = FILES["onnx" if kind == BackboneKind.ONNX else "resnet"]
    return replace(spec, file=name, kind=kind, input_size=size_record(size)), data


def default_input(image_size: ImageSize) -> tuple[int, int]:
    """The model input scaled to ImageNet's short side, each side a multiple of 8 (layer2's stride)."""
    h, w = input_hw(image_size)
    scale = IMAGENET_SIDE / min(h, w)
    return max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8)


def _read_state_dict(path: Path) -> tuple[BackboneKind, bytes]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a plain state dict
        raise DiffinspectError(f"backbone {path} is not a torch state dict (nor an .onnx model): "
                               f"{str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"state_dict": ...} or {"model": ...}, as training scripts save
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiffinspectError(f"backbone {path} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    kind = _recognise(path, state)
    trunk = ResNetTrunk(kind)
    wanted = {k: v for k, v in state.items() if k.split(".")[0] in LAYERS}
    for key, value in trunk.state_dict().items():  # older torch wrote no BatchNorm batch counters
        if key.endswith("num_batches_tracked"):
            wanted.setdefault(key, value)
    try:
        trunk.load_state_dict(wanted)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise DiffinspectError(f"backbone {path} is not a recognised ResNet: it does not fit a {kind} "
                               f"({first[:200]})") from None
    buf = io.BytesIO()
    torch.save(trunk.state_dict(), buf)
    return kind, buf.getvalue()


def _recognise(path: Path, state: dict[str, torch.Tensor]) -> BackboneKind:
    """Which ResNet a state dict is, from its block type, block counts and bottleneck width."""
    if "conv1.weight" not in state or state["conv1.weight"].dim() != 4:
        raise DiffinspectError(f"backbone {path} is not a recognised ResNet state dict: it has no conv1.weight "
                               f"(expected torchvision's keys conv1, bn1, layer1 ... layer3)")
    channels = state["conv1.weight"].shape[1]
    if channels != 3:
        raise DiffinspectError(f"backbone {path} takes {channels}-channel images: a backbone takes RGB "
                               f"(gray frames are repeated to 3 channels)")
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in (1, 2, 3))
    width = state["layer1.0.conv1.weight"].shape[0] if bottleneck and "layer1.0.conv1.weight" in state else 64
    for kind, (block, counts, per_group) in ARCHS.items():
        if (block is Bottleneck) == bottleneck and counts == blocks and per_group == width:
            return BackboneKind(kind)
    raise DiffinspectError(f"backbone {path} is not a recognised ResNet ({'bottleneck' if bottleneck else 'basic'} "
                           f"blocks {blocks} in layer1-3, width {width}): diffinspect knows "
                           f"{', '.join(map(str, ARCHS))}")


def _read_onnx(path: Path, size: int | list[int] | None, image_size: ImageSize) -> tuple[tuple[int, int], bytes]:
    """(its input size, its bytes) after a trial run on a batch of 2; onnxruntime reads it (no onnx package:
    this module is part of the runtime's torch backend)."""
    import onnxruntime as ort

    data = path.read_bytes()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:  # from its bytes, as the bundle will hold it: weights in external files are refused here
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        raise DiffinspectError(f"backbone {path} is not a self-contained ONNX model (weights in external data "
                               f"files: save it as one file): {str(exc).splitlines()[0][:200]}") from None
    inputs = session.get_inputs()
    shape = inputs[0].shape if len(inputs) == 1 and inputs[0].type == "tensor(float)" else None
    if shape is None or len(shape) != 4:
        raise DiffinspectError(f"backbone {path} has no image input: an ONNX feature model takes one float batch "
                               f"(N, 3, H, W), this one takes {', '.join(f'{i.name} {i.shape}' for i in inputs)}")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if fixed[1] not in (None, 3):
        raise DiffinspectError(f"backbone {path} takes {fixed[1]}-channel images: a backbone takes RGB "
                               f"(gray frames are repeated to 3 channels)")
    if fixed[0] is not None:
        raise DiffinspectError(f"backbone {path} takes batches of exactly {fixed[0]}: export it with a dynamic "
                               f"batch axis")
    hw = (fixed[2], fixed[3]) if None not in fixed[2:] else input_hw(size) if size else default_input(image_size)
    if size is not None and hw != input_hw(size):
        raise DiffinspectError(f"backbone {path} takes {hw[0]} x {hw[1]} images, not the configured {size}")
    try:
        outputs = session.run(None, {inputs[0].name: np.zeros((2, 3, *hw), np.float32)})
    except Exception as exc:
        raise DiffinspectError(f"backbone {path} fails on a (2, 3, {hw[0]}, {hw[1]}) batch: "
                               f"{str(exc).splitlines()[0][:200]}") from None
    for out, info in zip(outputs, session.get_outputs(), strict=True):
        if out.ndim != 4 or out.shape[0] != 2:
            raise DiffinspectError(f"backbone {path} output {info.name!r} has shape {out.shape} for a batch of 2, "
                                   f"not a feature map (N, C, h, w)")
    return hw, data
