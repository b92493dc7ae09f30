"""The anomaly-map recipe (no torch: the edge runtime reads it too)."""

from __future__ import annotations

from dataclasses import dataclass

TERMS = ("pixel", "ssim", "feature")  # the rebuild terms; "patch" joins where a bundle holds patch statistics
FUSION_RULES = ("minp", "sum", "max")  # how the frame-level embedding term joins the diffusion score
FRAME_DETECTORS = ("gaussian", "copod")  # which detector on the classical embeddings makes that term
PATCH_FILE = "patches.npz"  # the bundle file of the patch term's statistics (models/patches.py)


@dataclass(frozen=True)
class Recipe:
    """The anomaly-map recipe, stored in the manifest under `score`."""

    t_star: int = 100
    steps: int = 1
    noise_draws: int = 1
    pixel_weight: float = 1.0
    ssim_weight: float = 1.0
    feature_weight: float = 1.0
    # The patch term (models/patches.py): it joins the map of bundles that hold patch statistics. Off by
    # default: with it, the INT8 export misses the map parity bar (tests/test_export.py).
    patch_weight: float = 0.0
    blur_sigma: float = 2.0
    top_k: float = 0.001
    frame_weight: float = 0.0
    classical_weight: float = 1.0
    fusion: str = "minp"
    frame_detector: str = "gaussian"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        # Recipes written before these defaults summed, with COPOD.
        return cls(**{"fusion": "sum", "frame_detector": "copod", **known})

    def weights(self) -> dict[str, float]:
        w = {"pixel": self.pixel_weight, "ssim": self.ssim_weight, "feature": self.feature_weight,
             "patch": self.patch_weight}
        return {k: v for k, v in w.items() if v > 0}
