"""The anomaly-map recipe: the one scoring configuration (config `[score]`, manifest `score`). No torch:
the edge runtime reads it too."""

from __future__ import annotations

from dataclasses import dataclass

from diffinspect.vocab import FrameDetector, Fusion

TERMS = ("pixel", "ssim", "feature")  # the rebuild terms; "patch" joins where a bundle holds patch statistics
PATCH_FILE = "patches.npz"  # the bundle file of the patch term's statistics (models/patches.py)


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
    # default: with it, the INT8 export misses the map parity bar (tests/test_export.py).
    patch_weight: float = 0.0
    blur_sigma: float = 2.0  # pixels at model size, for the map users see
    top_k: float = 0.001  # image score = mean of the top share of the sharp (unblurred) map
    frame_weight: float = 0.0  # weight of the whole-frame mean map (defects covering the frame)
    classical_weight: float = 1.0  # frame-level term: a detector on classical embeddings (0 = off)
    fusion: Fusion = Fusion.MINP  # how the frame-level (embedding) term joins the diffusion score
    frame_detector: FrameDetector = FrameDetector.GAUSSIAN  # the detector on the embeddings for that term
    seed: int = 0

    # Recipes written before `fusion` and `frame_detector` existed summed, with COPOD (bundle.py reads
    # version-1 manifests so).
    OLD_DEFAULTS = {"fusion": Fusion.SUM, "frame_detector": FrameDetector.COPOD}

    def weights(self) -> dict[str, float]:
        w = {"pixel": self.pixel_weight, "ssim": self.ssim_weight, "feature": self.feature_weight,
             "patch": self.patch_weight}
        return {k: v for k, v in w.items() if v > 0}
