"""The anomaly-map recipe: the one scoring configuration (config `[score]`, manifest `score`). No torch:
the edge runtime reads it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffinspect.vocab import BackboneKind, FrameDetector, Fusion

TERMS = ("pixel", "ssim", "feature")  # the rebuild terms; "patch" joins where a bundle holds patch statistics
PATCH_FILE = "patches.npz"  # the bundle file of the patch term's statistics (models/patches.py)
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # the normalization torchvision's pretrained networks were trained with
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class Backbone:
    """A pretrained feature network the user supplies for the patch term (models/backbone.py); config
    `[score.backbone]` (and `inspect train --backbone FILE`), manifest `score.backbone`."""

    file: str | None = None  # config: the user's file; manifest: its copy in the bundle
    kind: BackboneKind | None = None  # found from the file when training
    # The frame at model size is resized to this (a side, or [height, width]); unset: chosen when training
    # (the input of a fixed-size ONNX model, else the model input scaled to ImageNet's 224 px short side).
    input_size: int | list[int] | None = None
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per RGB channel, on [0, 1] pixels
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def invalid(self) -> tuple[str, str, Any] | None:
        """(field, what it must be, its value) for the first bad setting; None when all are sound."""
        size = self.input_size
        sides = [size] if isinstance(size, int) else size or []
        if size is not None and (len(sides) not in (1, 2) or not all(16 <= s <= 4096 for s in sides)):
            return "input_size", "a side or [height, width] in [16, 4096]", size
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                return name, "3 numbers (R, G, B)" + (", each positive" if name == "std" else ""), values
        return None


@dataclass
class Recipe:
    """How a frame becomes an anomaly map and a score; `[score]` in the config, `score` in the manifest."""

    t_star: int = 100  # noise level a frame is taken to before it is rebuilt
    steps: int = 1  # DDIM steps of the rebuild (the teacher's; students are set by distillation)
    noise_draws: int = 1  # mean of K fixed noise draws
    pixel_weight: float = 1.0  # channel-mean L1 error
    ssim_weight: float = 1.0  # 1 - SSIM
    feature_weight: float = 1.0  # denoiser feature error between x and its rebuild
    # The patch term (models/patches.py): it joins the map of bundles that hold patch statistics. Off by
    # default: with it, the INT8 export misses the map parity bar (tests/test_export.py). A backbone turns it
    # on (train/api.py), since the term is what a backbone is for.
    patch_weight: float = 0.0
    blur_sigma: float = 2.0  # pixels at model size, for the map users see
    top_k: float = 0.001  # image score = mean of the top share of the sharp (unblurred) map
    frame_weight: float = 0.0  # weight of the whole-frame mean map (defects covering the frame)
    classical_weight: float = 1.0  # frame-level term: a detector on classical embeddings (0 = off)
    fusion: Fusion = Fusion.MINP  # how the frame-level (embedding) term joins the diffusion score
    frame_detector: FrameDetector = FrameDetector.KNN  # the detector on the embeddings for that term
    seed: int = 0
    backbone: Backbone | None = None  # set: the patch term reads this network's features, not the denoiser's

    # Recipes written before `fusion` and `frame_detector` existed summed, with COPOD (bundle.py reads
    # version-1 manifests so).
    OLD_DEFAULTS = {"fusion": Fusion.SUM, "frame_detector": FrameDetector.COPOD}

    def weights(self) -> dict[str, float]:
        w = {"pixel": self.pixel_weight, "ssim": self.ssim_weight, "feature": self.feature_weight,
             "patch": self.patch_weight}
        return {k: v for k, v in w.items() if v > 0}
