"""Rebuilding the denoisers and the scoring graph stored in a bundle (torch; imported lazily)."""

from __future__ import annotations

import torch

from diffinspect.bundle import Bundle
from diffinspect.data.image import parse_size
from diffinspect.models import build_model
from diffinspect.models.patches import PATCH_FILE, PatchGaussian
from diffinspect.models.sampler import resolve_sampler
from diffinspect.models.schedule import NoiseSchedule
from diffinspect.models.scoring import Recipe, ScoringGraph


def load_denoiser(bundle: Bundle, weights: str = "weights.pt") -> torch.nn.Module:
    m = bundle.manifest["model"]
    model = build_model(m["kind"], m["size"], parse_size(m["image_size"], "manifest model.image_size"), m["channels"])
    state = torch.load(bundle.file(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_patches(bundle: Bundle, weights: str = "weights.pt") -> PatchGaussian | None:
    """The patch statistics fitted on the features of `weights`; None where the bundle has none (bundles
    written before the patch term, tiles bundles, and students: distillation changes the features)."""
    if weights != "weights.pt" or not bundle.has(PATCH_FILE):
        return None
    return PatchGaussian.from_arrays(bundle.arrays(PATCH_FILE, {"channels": None, "mean": None, "whiten": None}))


def load_graph(bundle: Bundle, sampler: str | None = None, recipe: Recipe | None = None) -> ScoringGraph:
    """The scoring graph of the bundle, with the teacher (N DDIM steps) or the distilled student."""
    sampler = resolve_sampler(bundle, sampler)
    recipe = recipe or Recipe.from_dict(bundle.manifest["score"])
    schedule = NoiseSchedule.from_dict(bundle.manifest["schedule"])
    if sampler == "student":
        student = bundle.manifest["sampler"]["student"]
        return ScoringGraph(
            load_denoiser(bundle, student["weights"]), schedule, recipe, steps=student["steps"],
            patches=load_patches(bundle, student["weights"]))
    # After distillation "teacher" means the N-step rebuild the student was distilled from, so the
    # two samplers are compared as trained, whatever step count the recipe names.
    student = (bundle.manifest.get("sampler") or {}).get("student") or {}
    return ScoringGraph(load_denoiser(bundle), schedule, recipe, steps=student.get("teacher_steps"),
                        patches=load_patches(bundle))
