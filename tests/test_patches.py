"""The patch term: the denoiser's encoder activations as patch embeddings, a Gaussian per patch position."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from diffinspect.bundle import Bundle
from diffinspect.data.synthetic import render_frame
from diffinspect.models import build_model
from diffinspect.models.from_bundle import load_graph
from diffinspect.models.patches import PATCH_DIMS, PATCH_FILE, PatchGaussian, channel_subset
from diffinspect.models.scoring import ScoringGraph
from diffinspect.train.patches import fit_patch_statistics

SIZE = 64
PATCH_AUROC = 0.8  # the patch term alone on the synthetic line, from the session's tiny trained bundle


def _frames(n: int, seed: int, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [render_frame("metal", rng, SIZE, defect) for _ in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] > 0 for p in pairs])


def _distance(model: torch.nn.Module, patches: PatchGaussian, frames: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = ScoringGraph.to_input(torch.from_numpy(frames))
        return patches(model.features(x, torch.zeros(len(x)))).numpy()


@pytest.fixture(scope="module")
def synthetic() -> dict[str, np.ndarray]:
    good, _ = _frames(48, 0)
    test_good, _ = _frames(16, 1)
    bad, masks = _frames(16, 2, "spot")
    return {"good": good, "test_good": test_good, "bad": bad, "masks": masks}


def _separation(model: torch.nn.Module, data: dict[str, np.ndarray]) -> tuple[float, float]:
    """(image AUROC of the maximum patch distance, share of defect frames hotter inside the defect)."""
    patches = PatchGaussian.from_arrays(fit_patch_statistics(model, data["good"]))
    good, bad = _distance(model, patches, data["test_good"]), _distance(model, patches, data["bad"])
    scores = np.r_[good.reshape(len(good), -1).max(1), bad.reshape(len(bad), -1).max(1)]
    auroc = roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], scores)
    h, w = bad.shape[1:]
    hotter = []
    for dist, mask in zip(bad, data["masks"], strict=True):
        inside = mask.reshape(h, SIZE // h, w, SIZE // w).any(axis=(1, 3))  # patches the defect touches
        hotter.append(dist[inside].mean() > dist[~inside].mean())
    return float(auroc), float(np.mean(hotter))


def test_patch_distance_finds_defects_and_fails_without_features(synthetic):
    torch.manual_seed(0)
    model = build_model("unet", "tiny", SIZE, 3).eval()
    auroc, hotter = _separation(model, synthetic)
    assert auroc > 0.9 and hotter > 0.8
    # The detector lives on the encoder's features: zeroed weights leave nothing to separate.
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    auroc, hotter = _separation(model, synthetic)
    assert auroc == 0.5 and hotter == 0.0


def test_statistics_shapes_and_channel_subset(synthetic):
    torch.manual_seed(0)
    model = build_model("unet", "tiny", SIZE, 3).eval()
    stats = fit_patch_statistics(model, synthetic["good"][:8])
    p, d = stats["mean"].shape
    assert p == (SIZE // 4) ** 2 and d == min(PATCH_DIMS, 16 + 16 + 32)  # tiny: 16, 16, 32 channels
    assert stats["whiten"].shape == (p, d, d) and np.isfinite(stats["whiten"]).all()
    kept = channel_subset(200)
    assert len(kept) == PATCH_DIMS and np.all(np.diff(kept) > 0) and np.array_equal(kept, channel_subset(200))


def test_a_trained_bundle_scores_with_the_patch_term(trained_bundle, line_dir):
    """Training writes the patch statistics; the scoring graph reads them as its fourth term, and that
    term alone separates the synthetic line's defects."""
    from diffinspect.data.datasets import labelled_set
    from diffinspect.data.image import read_image
    from diffinspect.scoring.diffusion import fit_frames

    b = Bundle.load(trained_bundle)
    assert b.has(PATCH_FILE)
    assert "patch" not in load_graph(b).term_names  # off by default (models/recipe.py)
    graph = load_graph(b, recipe=replace(b.manifest.score, patch_weight=1.0))
    assert graph.term_names == ["pixel", "ssim", "feature", "patch"]
    prep = b.manifest.preprocess
    test = labelled_set(line_dir)
    frames = fit_frames([read_image(s.path, prep.color) for s in test.samples], prep)
    labels = [s.is_anomalous for s in test.samples]

    def patch_auroc() -> float:
        with torch.no_grad():
            raw = graph.raw_terms(torch.from_numpy(frames)).numpy()
        return roc_auc_score(labels, raw[:, 3].reshape(len(raw), -1).max(1))

    assert patch_auroc() > PATCH_AUROC
    with torch.no_grad():  # the term lives on the denoiser's features: without them it is chance
        for param in graph.denoiser.parameters():
            param.zero_()
    assert patch_auroc() < 0.6
