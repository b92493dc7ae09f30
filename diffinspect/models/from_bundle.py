"""Rebuilding the denoisers and the scoring graph stored in a bundle (torch; imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffinspect.models import build_model
from diffinspect.models.backbone import BackboneFeatures, build_backbone
from diffinspect.models.patches import BACKBONE_GRID, DENOISER_GRID, PATCH_FILE, PatchGaussian
from diffinspect.models.sampler import resolve_sampler
from diffinspect.models.scoring import Recipe, ScoringGraph

if TYPE_CHECKING:  # a type only: the bundle module reads models' recipe and schedule
    from diffinspect.bundle import Bundle


def load_denoiser(bundle: Bundle, weights: str = "weights.pt") -> torch.nn.Module:
    m = bundle.model
    model = build_model(m.kind, m.size, m.image_size, m.channels)
    state = torch.load(bundle.file(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_patches(bundle: Bundle, weights: str = "weights.pt") -> PatchGaussian | None:
    """The patch statistics fitted on the features of `weights` or of the bundle's backbone; None where the
    bundle has none (bundles written before the patch term, tiles bundles, and students without a
    backbone: distillation changes the denoiser's features, not the backbone's)."""
    backbone = bundle.recipe.backbone is not None
    if (weights != "weights.pt" and not backbone) or not bundle.has(PATCH_FILE):
        return None
    arrays = bundle.arrays(PATCH_FILE, {"channels": None, "mean": None, "whiten": None})
    return PatchGaussian.from_arrays(arrays, BACKBONE_GRID if backbone else DENOISER_GRID)


def load_backbone(bundle: Bundle) -> BackboneFeatures | None:
    """The backbone whose features the patch term reads (None: the denoiser's own)."""
    spec = bundle.recipe.backbone
    return None if spec is None else build_backbone(spec, bundle.file(str(spec.file)))


def load_graph(bundle: Bundle, sampler: str | None = None, recipe: Recipe | None = None) -> ScoringGraph:
    """The scoring graph of the bundle, with the teacher (N DDIM steps) or the distilled student."""
    sampler = resolve_sampler(bundle, sampler)
    recipe = recipe or bundle.recipe
    schedule = bundle.schedule
    student = bundle.manifest.student
    backbone = load_backbone(bundle) if recipe.patch_weight > 0 else None  # only the patch term reads it
    if sampler == "student":
        assert student is not None  # resolve_sampler refuses a bundle without one
        return ScoringGraph(load_denoiser(bundle, student.weights), schedule, recipe, steps=student.steps,
                            patches=load_patches(bundle, student.weights), backbone=backbone)
    # After distillation "teacher" means the N-step rebuild the student was distilled from, so the
    # two samplers are compared as trained, whatever step count the recipe names.
    return ScoringGraph(load_denoiser(bundle), schedule, recipe, steps=student and student.teacher_steps,
                        patches=load_patches(bundle), backbone=backbone)
