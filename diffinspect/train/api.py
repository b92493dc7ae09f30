"""`train(data, out, cfg)`: decode the good images, fit the denoiser, write the bundle atomically."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffinspect import DiffinspectError
from diffinspect import bundle as bundle_io
from diffinspect.bundle import Bundle, Manifest, Model, Schedule, Training
from diffinspect.config import Config
from diffinspect.data.datasets import normal_images
from diffinspect.data.image import Preprocess, choose_color, parse_size
from diffinspect.info import training_warning
from diffinspect.logs import Progress
from diffinspect.models.backbone import build_backbone, read_backbone
from diffinspect.models.patches import PATCH_FILE
from diffinspect.models.recipe import Recipe
from diffinspect.train.data import TrainingSet, load_training_set
from diffinspect.train.fit import TrainResult, clear_checkpoints, fit, model_summary
from diffinspect.train.geometry import DEFAULT_SIDE, Geometry, choose_geometry, describe_size, frame_sizes
from diffinspect.train.patches import fit_patch_statistics

log = logging.getLogger(__name__)

WEIGHTS = "weights.pt"
BACKBONE_PATCH_WEIGHT = 1.0  # the patch term's weight with a backbone, unless the config sets one


def input_geometry(images: list[Path], cfg: Config) -> Geometry:
    """The model input size: as configured, else chosen from the frames (whole frames only: tiles are cut
    at native scale, where the default square tile already keeps a defect's pixels)."""
    d = cfg.data
    if d.image_size is not None:
        size = parse_size(d.image_size, "data.image_size")
        return Geometry(size, (0, 0), 0, d.defect_size, f"{describe_size(size)} as configured")
    if d.feed == "tiles":
        return Geometry(DEFAULT_SIDE, (0, 0), 0, d.defect_size, f"{DEFAULT_SIDE} px square tiles (the default)")
    sizes = frame_sizes(images, d.roi)
    return choose_geometry(sizes, d.defect_size, cfg.model.kind, cfg.model.size)


def preprocess_for(data: Path, cfg: Config, geometry: Geometry | None = None) -> Preprocess:
    d = cfg.data
    images = normal_images(data)
    color = choose_color(images, d.color)
    geometry = geometry or input_geometry(images, cfg)
    return Preprocess(color=color, image_size=geometry.image_size, resize=d.resize,
                      roi=tuple(d.roi) if d.roi else None, feed=d.feed, tile_scale=d.tile_scale)


def _with_backbone(score: Recipe, prep: Preprocess) -> tuple[Recipe, bytes]:
    """The recipe with the user's backbone checked and recorded (kind, input size, its bundle file) and the
    patch term on, and the bytes of its copy in the bundle; the recipe as it is without a backbone."""
    if score.backbone is None:
        return score, b""
    if not score.backbone.file:
        raise DiffinspectError("config [score.backbone] names no file: pass --backbone FILE")
    if prep.feed == "tiles":
        raise DiffinspectError("a backbone feeds the patch term, which tiles have none of (no fixed patch "
                               "positions): train on whole frames (data.feed = \"frame\") to use one")
    spec, data = read_backbone(score.backbone, prep.image_size)
    weight = score.patch_weight if score.patch_weight > 0 else BACKBONE_PATCH_WEIGHT
    return replace(score, backbone=spec, patch_weight=weight), data


def snapshot_path(out: Path, minutes: float) -> Path:
    """Where `train(..., snapshots=...)` writes the bundle taken after `minutes` CPU minutes."""
    return out.with_name(f"{out.name}_{minutes:g}min")


def train(
    data: str | Path,
    out: str | Path,
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_step: Callable[[int], None] | None = None,
    snapshots: Sequence[float] = (),
    on_snapshot: Callable[[float, Bundle], None] | None = None,
) -> Bundle | None:
    """Fit and write the bundle; None on torchrun ranks other than 0 (rank 0 writes the one bundle).

    snapshots: CPU minutes of training (loop.cpu_minutes) after which a full bundle of the model so far is
    also written, to snapshot_path(out, minutes) (replacing one there), and handed to on_snapshot; without
    a step or minute budget in cfg the last snapshot ends the training (time-to-accuracy curves)."""
    data, out = Path(data).resolve(), Path(out).resolve()
    bundle_io.check_output(out, overwrite, resume, bundle_io.TRAIN_HINT)  # before minutes of training
    geometry = input_geometry(normal_images(data), cfg)
    prep = preprocess_for(data, cfg, geometry)
    score, backbone_bytes = _with_backbone(cfg.score, prep)  # checked before minutes of training
    log.info(f"model input: {geometry.reason}")
    if score.backbone is not None:
        log.info(f"backbone: {score.backbone.kind} at {describe_size(score.backbone.input_size)}, "
                 f"patch term weight {score.patch_weight:g}")
    tset = load_training_set(data, prep, cfg.data.holdout, cfg.train.seed)
    size = describe_size(prep.image_size)
    fed = f", {size} tiles at {prep.tile_scale:g}x scale" if prep.feed == "tiles" else ""
    log.info(f"training on {len(tset.train_files)} images ({prep.color}, {size}{fed}), "
             f"{len(tset.holdout_files)} held back for calibration")

    def snapshot(minutes: float, result: TrainResult) -> None:
        b = _write(snapshot_path(out, minutes), result, tset, cfg, score, backbone_bytes, prep, geometry)
        log.info(f"snapshot after {minutes:g} CPU minutes ({result.steps} steps): {b.path}")
        if on_snapshot is not None:
            on_snapshot(minutes, b)

    result = fit(tset, cfg, out, resume=resume, progress=progress, on_step=on_step,
                 snapshot_minutes=snapshots, on_snapshot=snapshot)
    if int(torch.distributed.is_initialized() and torch.distributed.get_rank()) != 0:
        return None  # only rank 0 writes the bundle
    bundle = _write(out, result, tset, cfg, score, backbone_bytes, prep, geometry)
    clear_checkpoints(out)
    log.info(f"trained {result.steps} steps in {result.seconds / 60:.1f} min "
             f"({result.steps_per_second:.2f} steps/s), loss {result.final_loss:.4f}")
    if warning := training_warning(bundle.manifest):
        log.warning(warning)
    return bundle


def _write(out: Path, result: TrainResult, tset: TrainingSet, cfg: Config, score: Recipe, backbone_bytes: bytes,
           prep: Preprocess, geometry: Geometry) -> Bundle:
    """The bundle of a trained model: weights, manifest, the backbone's copy and patch statistics, written
    atomically."""
    channels = 3 if prep.color == "rgb" else 1
    summary = model_summary(result.model, prep.image_size, channels)
    manifest = Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model=Model(cfg.model.kind, cfg.model.size, prep.image_size, channels, summary["params"],
                    round(summary["gflops"], 4)),
        preprocess=prep,
        schedule=Schedule(cfg.model.schedule),
        score=score,
        training=Training(
            data=str(tset.root), source=str(tset.source),
            train_files=tset.relative(tset.train_files), holdout_files=tset.relative(tset.holdout_files),
            skipped=[[str(p), why] for p, why in tset.skipped],
            steps=result.steps, seconds=round(result.seconds, 1),
            steps_per_second=round(result.steps_per_second, 3), final_loss=round(result.final_loss, 5),
            device=str(cfg.train.device), config=cfg.to_dict(), geometry=geometry.to_dict(),
        ),
    )
    with bundle_io.creating(out, overwrite=True) as tmp:
        torch.save(result.model.state_dict(), tmp / WEIGHTS)
        files, backbone = [WEIGHTS], None
        if score.backbone is not None:  # the bundle holds its copy, so it stays self-contained
            (tmp / str(score.backbone.file)).write_bytes(backbone_bytes)
            files.append(str(score.backbone.file))
            backbone = build_backbone(score.backbone, tmp / str(score.backbone.file))
            backbone.to(next(result.model.parameters()).device)
        # Per-position patch statistics need frames of one geometry: tiles cut anywhere have no positions.
        if prep.feed != "tiles":
            np.savez(tmp / PATCH_FILE, **fit_patch_statistics(result.model, tset.images, backbone=backbone))
            files.append(PATCH_FILE)
        bundle_io.finish(tmp, manifest, files)
    return Bundle.load(out)
