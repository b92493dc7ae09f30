"""`inspect train BUNDLE --add-good DIR`: fine-tune a bundle's model on new good images, then recalibrate.

The model starts from the bundle's weights and trains with the recipe it was trained with (optimizer,
learning rate, augmentation, the EMA of the weights), for fewer steps: by default a quarter of its first
training's. It learns from the new good images and the reviewed good parts the bundle holds for
calibration (`calibrate --add-reviewed`); both are copied into the bundle, and the reviewed ones leave the
calibration images, since a threshold's bound needs images nothing was fitted on. Then the bundle is
calibrated again as it was last calibrated (folder, rate, confidence).

Everything the weights fed goes stale and is refitted or dropped: the patch statistics are refitted on
every training image, and a distilled student (a copy of the old model) is removed: distil again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Samplers, Training
from diffinspect.config import Config, TrainConfig, load_config
from diffinspect.data.datasets import list_images
from diffinspect.data.reading import read_images
from diffinspect.logs import Progress
from diffinspect.models.from_bundle import load_backbone, load_denoiser
from diffinspect.models.patches import PATCH_FILE
from diffinspect.scoring.calibrate import calibrate, image_sets
from diffinspect.train.api import WEIGHTS
from diffinspect.train.data import MIN_IMAGES, TrainingSet
from diffinspect.train.fit import clear_checkpoints, fit
from diffinspect.train.patches import fit_patch_statistics

log = logging.getLogger(__name__)

FINETUNE_SHARE = 4  # the default fine-tune: a quarter of the first training's steps


@dataclass
class FinetuneResult:
    bundle: Bundle
    new: int  # new good images added to the bundle (others were in it already)
    reviewed: int  # reviewed good parts moved from calibration to training
    images: int  # images the fine-tune learnt from
    steps: int
    seconds: float
    recalibrated: str | None  # the bound of the new calibration; None when the bundle had none


def finetune_config(bundle: Bundle, steps: int | None, max_minutes: float | None, device: str | None,
                    seed: int | None) -> Config:
    """The bundle's own training recipe (its model and train sections as recorded), with a new budget."""
    training = bundle.manifest.training or Training()
    recorded = training.config or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "max_minutes"}
    overrides = {}
    for key, value in (recorded.get("train") or {}).items():
        if key in known and isinstance(value, dict):  # a section (augment): key by key
            overrides |= {f"train.{key}.{k}": v for k, v in value.items()}
        elif key in known:
            overrides[f"train.{key}"] = value
    overrides |= {"model.kind": bundle.model.kind, "model.size": bundle.model.size}
    if steps is None and max_minutes is None:
        steps = max(1, (training.steps or 0) // FINETUNE_SHARE) if training.steps else None
        if steps is None:
            raise DiffinspectError(f"bundle {bundle.path} does not say how long it trained: give --steps N")
    overrides |= {"train.steps": steps, "train.max_minutes": max_minutes, "train.device": device,
                  "train.seed": seed}
    return load_config(None, overrides)


def finetune(bundle_path: str | Path, add_good: str | Path, steps: int | None = None,
             max_minutes: float | None = None, device: str | None = None, seed: int | None = None,
             resume: bool = False, progress: Progress | None = None
             ) -> FinetuneResult:
    bundle = Bundle.load(bundle_path)
    prep = bundle.manifest.preprocess
    cfg = finetune_config(bundle, steps, max_minutes, device, seed)
    new = list_images(add_good)
    if not new:
        raise DiffinspectError(f"no images found under {add_good}")
    if bundle.manifest.calibration is not None:  # the calibration images must still be there afterwards
        image_sets(bundle, bundle.manifest.calibration.folder)
    reviewed = bundle.added_paths("calibration")
    fit_frame = prep.canvas if prep.feed == "tiles" else prep.fit
    read = read_images(new + reviewed, prep.color, "new good images", transform=fit_frame)
    if len(read.frames) < MIN_IMAGES:
        raise DiffinspectError(f"only {len(read.frames)} readable good images to fine-tune on (new and reviewed); "
                               f"at least {MIN_IMAGES} are needed")
    images = read.frames if prep.feed == "tiles" else np.stack(read.frames)
    data = TrainingSet(Path(add_good), prep, read.paths, [], images, read.skipped)
    log.info(f"fine-tuning on {len(read.frames)} good images ({len(new)} new, {len(reviewed)} reviewed) "
             f"for {cfg.train.steps} steps")
    init = load_denoiser(bundle).state_dict()
    result = fit(data, cfg, bundle.path, resume=resume, progress=progress, init=init)
    with bundle.updating("fine-tune") as up:
        added = up.add_images(new, "training", "new good images (fine-tune)", str(Path(add_good).resolve()))
        moved = list(up.manifest.added.calibration)
        up.manifest.added.training += moved
        up.manifest.added.calibration = []
        up.manifest.added.history[-1] |= {"reviewed_now_training": len(moved), "steps": result.steps,
                                          "seconds": round(result.seconds, 1),
                                          "final_loss": round(result.final_loss, 5)}
        staged = up.staging_path(WEIGHTS)
        torch.save(result.model.state_dict(), staged)
        up.add_file(WEIGHTS, staged)
        if bundle.has(PATCH_FILE):
            _refit_patches(up, result.model, prep, fit_frame)
        if up.manifest.student is not None:
            up.remove_file(up.manifest.student.weights)
            up.manifest.sampler = Samplers()
            log.warning("the distilled student was a copy of the model before this fine-tune: removed; "
                        f"distil again (inspect distill {bundle.path})")
    clear_checkpoints(bundle.path)
    log.info(f"fine-tuned {result.steps} steps in {result.seconds / 60:.1f} min, loss {result.final_loss:.4f}")
    return FinetuneResult(bundle, added, len(moved), len(read.frames), result.steps, result.seconds,
                          _recalibrate(bundle))


def _refit_patches(up, model: torch.nn.Module, prep, fit_frame) -> None:  # noqa: ANN001
    """The patch statistics on the new weights' features (or the backbone's), over every training image at hand."""
    bundle = up.bundle
    paths = (bundle.manifest.training or Training()).paths_on_disk() + [
        up.folder / n for n in up.manifest.added.training]
    frames = read_images(paths, prep.color, "training images", transform=fit_frame).frames
    backbone = load_backbone(bundle)
    if backbone is not None:
        backbone.to(next(model.parameters()).device)
    staged = up.staging_path(PATCH_FILE)
    with open(staged, "wb") as f:
        np.savez(f, **fit_patch_statistics(model, np.stack(frames), backbone=backbone))
    up.add_file(PATCH_FILE, staged)


def _recalibrate(bundle: Bundle) -> str | None:
    """Calibrate the fine-tuned bundle as it was last calibrated; None when it never was."""
    cal = bundle.manifest.calibration
    if cal is None:
        log.warning(f"bundle {bundle.path} was not calibrated: calibrate it (inspect calibrate {bundle.path})")
        return None
    result = calibrate(bundle.path, cal.folder, cal.false_reject_rate, backend="torch", confidence=cal.confidence)
    return result.bound
