"""The closed sets of values that config, the command line and the bundle manifest share.

Each is a `str` enum, so a member compares equal to its text, serialises as that text in JSON and TOML,
and Typer offers exactly these values as a flag's choices. The order is the one error messages list.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A str enum whose str() is its value (as Python 3.11's StrEnum, but also what Typer shows)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def listed(cls) -> str:
        return ", ".join(cls.values())


class Color(Choice):
    AUTO = "auto"  # config only: chosen from the training images; a bundle is gray or rgb
    GRAY = "gray"
    RGB = "rgb"


class Resize(Choice):
    """How a frame whose aspect ratio differs from the model input's becomes the input."""

    STRETCH = "stretch"
    CROP = "crop"
    PAD = "pad"


class Feed(Choice):
    """frame: the whole frame is one input; tiles: overlapping tiles at a share of native resolution."""

    FRAME = "frame"
    TILES = "tiles"


class ModelKind(Choice):
    UNET = "unet"
    DIT = "dit"


class ModelSize(Choice):
    TINY = "tiny"
    SMALL = "small"
    BASE = "base"


class ScheduleKind(Choice):
    LINEAR = "linear"
    COSINE = "cosine"


class Fusion(Choice):
    """How the frame-level embedding term joins the diffusion score."""

    SUM = "sum"
    MAX = "max"
    MINP = "minp"


class FrameDetector(Choice):
    """The detector on the classical embeddings that makes the frame-level term."""

    GAUSSIAN = "gaussian"
    COPOD = "copod"
    KNN = "knn"


class BackboneKind(Choice):
    """A pretrained feature network the user supplies for the patch term (models/backbone.py)."""

    RESNET18 = "resnet18"
    RESNET34 = "resnet34"
    RESNET50 = "resnet50"
    WIDE_RESNET50_2 = "wide_resnet50_2"
    ONNX = "onnx"  # an ONNX feature model: an image batch in, one or more feature maps out


class Device(Choice):
    """Where training runs."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Detector(Choice):
    """Which of a bundle's detectors scores frames."""

    DIFFUSION = "diffusion"
    COPOD = "copod"


class Sampler(Choice):
    TEACHER = "teacher"
    STUDENT = "student"


class Backend(Choice):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class Overlays(Choice):
    """Which frames `inspect watch` draws a heatmap overlay for."""

    NG = "ng"
    ALL = "all"
    NONE = "none"


class OverlayFormat(Choice):
    """How overlays are written: PNG (lossless) or JPEG (far cheaper to encode)."""

    PNG = "png"
    JPG = "jpg"


class After(Choice):
    """What `inspect watch` does with a frame's file once its row is committed."""

    KEEP = "keep"
    MOVE = "move"
    DELETE = "delete"


class ExportFormat(Choice):
    ONNX = "onnx"
    OPENVINO = "openvino"


class Precision(Choice):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
