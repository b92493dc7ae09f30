"""Distilling the teacher's N-step DDIM rebuild into a 1, 2 or 4 step student.

Method: direct regression through the unrolled sampler. The student starts as a copy of the teacher
and runs the scoring graph's own S-step DDIM path from t* (`ScoringGraph.reconstruct`, so training
and scoring share one convention); the loss is the image-space L2 between its x̂0 and the teacher's
N-step x̂0 from the same x_t*, backpropagated through all S passes. Only the timesteps of the
student's path, all in [0, t*], are trained.

Why not progressive distillation (Salimans & Ho 2022): on the same budget, rounds 8 -> 4 -> 2 -> 1
matched the teacher less well and lost test AUROC, each round regressing the previous round's rebuild
(bench/distill.py compares them; README). With S <= 4 the unrolled backward pass is cheap, and one
round spends the whole budget on the target that scoring uses.

Healing (`defect_share`, default 0.5): half of the student's inputs carry a pasted synthetic defect
while the target stays the teacher's rebuild of the clean image (targets.py). Pure teacher matching
made detection worse on magnetic_tile, whose teacher is weaker than its own one-step prediction (so
selection kept the undistilled weights); with healing the 1-step student detects better than both the
undistilled model and the teacher (bench/distill.py; figures in the README).

The checkpoint kept is the one that detects synthetic defects best (see selection.py), not the one
that matches the teacher best.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, Calibration, Manifest, Samplers, Student, Training, plain
from diffinspect.config import DISTILL_DEFECT_SHARE, AugmentConfig
from diffinspect.data.image import Preprocess
from diffinspect.logs import Progress
from diffinspect.models.device import resolve_device
from diffinspect.models.from_bundle import load_denoiser
from diffinspect.models.scoring import ScoringGraph
from diffinspect.train.augment import augment_batch
from diffinspect.train.loop import UNBOUNDED, Checkpoint, Clock, budget
from diffinspect.train.selection import SelectionSet, measure, read_frames, reconstructions, selection_set
from diffinspect.train.targets import TargetPool
from diffinspect.vocab import Sampler

log = logging.getLogger(__name__)

STEP_CHOICES = (1, 2, 4)
STUDENT_FILE = "student.pt"
DEFAULT_ITERATIONS = 1500
DEFAULT_MAX_MINUTES = 10.0
EVALUATIONS = 4  # after the start: at 1/4, 2/4, 3/4 and the end of the run
CHECKPOINT_EVERY = 100
POOL_BATCHES = 4  # the target pool holds this many batches
REUSE = 4  # each teacher target feeds about this many student batches
LR = 2e-4  # fine-tuning from the teacher: a tenth of the training rate keeps its features usable
MIN_IMAGES = 4


def checkpoint_dir(bundle_path: str | Path) -> Path:
    p = Path(bundle_path).resolve()
    return p.with_name(p.name + ".distill-checkpoint")


def _check_args(steps: int, teacher_steps: int, iterations: int | None, max_minutes: float | None,
                batch_size: int, defect_share: float) -> None:
    if steps not in STEP_CHOICES:
        raise DiffinspectError(f"student steps must be 1, 2 or 4, got {steps}")
    if teacher_steps <= steps:
        raise DiffinspectError(f"teacher steps ({teacher_steps}) must exceed student steps ({steps})")
    if iterations is not None and iterations < 1:
        raise DiffinspectError(f"iterations must be at least 1, got {iterations}")
    if max_minutes is not None and not 0 < max_minutes < math.inf:  # also refuses NaN
        raise DiffinspectError(f"max minutes must be positive, got {max_minutes}")
    if batch_size < 1:
        raise DiffinspectError(f"batch size must be at least 1, got {batch_size}")
    if not 0.0 <= defect_share <= 1.0:
        raise DiffinspectError(f"defect share must be between 0 and 1, got {defect_share}")


def _training_images(training: Training, paths: list[Path], prep: Preprocess) -> torch.Tensor:
    """The training images at model size, uint8 (N, C, S, S); refused when too few are left on disk."""
    frames = read_frames(paths, prep)
    if len(frames) < MIN_IMAGES:
        raise DiffinspectError(
            f"distillation needs the training images, but only {len(frames)} of "
            f"{len(training.train_files)} are on disk under {training.source}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _augmenter(training: Training, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The augmentations the teacher was trained with, so the student sees the same image family."""
    raw = (training.config.get("train") or {}).get("augment")
    if not raw:
        return None
    aug = AugmentConfig(**{k: v for k, v in raw.items() if k in AugmentConfig.__dataclass_fields__})
    if aug == AugmentConfig():
        return None
    return lambda x: augment_batch(x, aug, gen)


def _rank(rec: dict) -> tuple[float, float]:
    """Best synthetic-defect AUROC first; at equal AUROC the closer match to the teacher."""
    return (-1.0 if np.isnan(rec["auroc"]) else rec["auroc"], -rec["teacher_mse"])


class _Run:
    """The state a checkpoint holds: student, optimizer, pool, RNG, evaluations, best so far."""

    def __init__(self, student: ScoringGraph, pool: TargetPool, gen: torch.Generator, lr: float):
        self.student, self.pool, self.gen = student, pool, gen
        self.opt = torch.optim.AdamW(student.denoiser.parameters(), lr=lr, weight_decay=0.0)
        self.iteration, self.elapsed = 0, 0.0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def state_dict(self, extra: dict) -> dict:
        return {"student": self.student.denoiser.state_dict(), "opt": self.opt.state_dict(),
                "pool": self.pool.state_dict(), "gen": self.gen.get_state(), "iteration": self.iteration,
                "elapsed": self.elapsed, "history": self.history, "best": self.best,
                "best_state": self.best_state, **extra}

    def load_state_dict(self, state: dict) -> None:
        self.student.denoiser.load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        self.pool.load_state_dict(state["pool"])
        self.gen.set_state(state["gen"])
        self.iteration, self.elapsed = int(state["iteration"]), float(state["elapsed"])
        self.history, self.best, self.best_state = state["history"], state["best"], state["best_state"]

    def train_step(self, batch_size: int, refresh: int) -> float:
        """One optimizer step on a batch from the pool (a few targets refreshed first); the loss."""
        self.pool.refresh(refresh)
        x, eps, target = self.pool.sample(batch_size)
        loss = F.mse_loss(self.student.reconstruct(x, eps), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.denoiser.parameters(), 1.0)
        self.opt.step()
        self.iteration += 1
        return float(loss.detach())

    def evaluate(self, sel: SelectionSet, teacher_rec: torch.Tensor, loss: float) -> dict:
        net = self.student.denoiser.eval()
        auroc = measure(self.student, sel)
        mse = float(F.mse_loss(reconstructions(self.student, sel.good), teacher_rec))
        net.train()
        rec = {"iteration": self.iteration, "auroc": round(auroc, 4), "teacher_mse": float(f"{mse:.4g}"),
               "loss": None if np.isnan(loss) else float(f"{loss:.4g}")}
        self.history.append(rec)
        if self.best is None or _rank(rec) > _rank(self.best):
            self.best = rec
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return rec


def distill(
    bundle_path: str | Path,
    steps: int = 2,
    teacher_steps: int = 10,
    iterations: int | None = None,
    max_minutes: float | None = None,
    device: str = "auto",
    batch_size: int = 16,
    resume: bool = False,
    progress: Progress | None = None,
    lr: float = LR,
    seed: int = 0,
    defect_share: float = DISTILL_DEFECT_SHARE,
) -> dict:
    """Distil the bundle's teacher into an S-step student and write student.pt into the bundle.

    Progress: task "distilling", in iterations, with loss and seconds as in training; checkpoints go to
    `<bundle>.distill-checkpoint/`. Returns a summary: the evaluations, the kept iteration and, when
    the bundle was calibrated, the new calibration.
    """
    _check_args(steps, teacher_steps, iterations, max_minutes, batch_size, defect_share)
    bundle = Bundle.load(bundle_path)
    m = bundle.manifest
    if m.model is None:
        raise DiffinspectError(f"bundle {bundle.path} has no diffusion model to distil")
    dev = resolve_device(device)
    recipe, schedule = bundle.recipe, bundle.schedule
    teacher = ScoringGraph(load_denoiser(bundle).requires_grad_(False), schedule, recipe, teacher_steps).to(dev)
    student = ScoringGraph(load_denoiser(bundle), schedule, recipe, steps).to(dev)
    student.denoiser.train()

    prep, training = m.preprocess, m.training or Training()
    train_paths = training.paths_on_disk()  # the holdout stays untouched for calibration
    images = _training_images(training, train_paths, prep)
    gen = torch.Generator().manual_seed(seed)
    pool = TargetPool(images, teacher, POOL_BATCHES * batch_size, gen, _augmenter(training, gen),
                      defect_share=defect_share)
    run = _Run(student, pool, gen, lr)
    sel = selection_set(train_paths, prep, seed)
    total, minutes = budget(iterations, max_minutes, DEFAULT_ITERATIONS, DEFAULT_MAX_MINUTES)
    config = {"steps": steps, "teacher_steps": teacher_steps, "batch_size": batch_size,
              "teacher_sha256": m.files["weights.pt"], "seed": seed, "defect_share": defect_share}
    ckpt = Checkpoint(checkpoint_dir(bundle.path), "distillation")

    if resume:
        state = ckpt.load()
        if state["config"] != config:
            raise DiffinspectError(f"the checkpoint at {ckpt.path} was made with other settings "
                                   f"({state['config']}); run without --resume to start over")
        run.load_state_dict(state)
        teacher_auroc, teacher_rec = state["teacher_auroc"], state["teacher_rec"].to(dev)
        log.info(f"resuming distillation at iteration {run.iteration}")
    else:
        log.info(f"distilling the {teacher_steps}-step teacher into a {steps}-step student "
                 f"(t* = {recipe.t_star}) on {len(images)} images; selection on {sel.source} "
                 f"+ {int(sel.labels.sum())} synthetic defects")
        teacher_auroc, teacher_rec = measure(teacher, sel), reconstructions(teacher, sel.good)
        pool.refresh(len(pool))

    def save() -> None:
        run.elapsed = clock.elapsed()
        ckpt.save(run.state_dict({"config": config, "teacher_auroc": teacher_auroc,
                                  "teacher_rec": teacher_rec.cpu()}))

    def report(rec: dict) -> None:
        log.info(f"iteration {rec['iteration']}: synthetic-defect AUROC {rec['auroc']:.3f} "
                 f"(teacher {teacher_auroc:.3f}), teacher-match MSE {rec['teacher_mse']:.2e}")

    if not run.history:
        report(run.evaluate(sel, teacher_rec, float("nan")))
    clock, loss_ema = Clock(minutes, run.elapsed), float("nan")
    refresh = max(1, batch_size // REUSE)
    with ckpt.on_interrupt("distillation", "iteration", lambda: run.iteration, save):
        while run.iteration < total:
            run.elapsed = clock.elapsed()
            if clock.over():
                break
            value = run.train_step(batch_size, refresh)
            loss_ema = value if np.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
            run.elapsed = clock.elapsed()
            done = max(run.iteration / total, clock.share())
            if done >= len(run.history) / EVALUATIONS and run.iteration < total:
                report(run.evaluate(sel, teacher_rec, loss_ema))
                save()
            elif run.iteration % CHECKPOINT_EVERY == 0:
                save()
            if progress is not None:
                progress("distilling", run.iteration, None if total == UNBOUNDED else total, loss=loss_ema,
                         seconds=run.elapsed)
    if run.history[-1]["iteration"] != run.iteration:
        report(run.evaluate(sel, teacher_rec, loss_ema))
    run.elapsed = clock.elapsed()
    return _finish(bundle, run, config, teacher_auroc, sel, device)


def _finish(bundle: Bundle, run: _Run, config: dict, teacher_auroc: float, sel: SelectionSet,
            device: str) -> dict:
    best = run.best
    assert best is not None and run.best_state is not None
    selection = {"metric": "image AUROC on synthetic defects", **sel.describe(),
                 "teacher_auroc": round(teacher_auroc, 4), "chosen_iteration": best["iteration"],
                 "auroc": best["auroc"], "teacher_mse": best["teacher_mse"], "history": run.history}
    student = Student(weights=STUDENT_FILE, steps=config["steps"], teacher_steps=config["teacher_steps"],
                      t_star=run.student.recipe.t_star,  # the student's path is only trained for this t*
                      iterations=run.iteration, seconds=round(run.elapsed, 1),
                      method="direct unrolled L2" + (", healing pasted defects" if config["defect_share"] else ""),
                      defect_share=config["defect_share"], selection=selection)
    stale = _stale_exports(bundle.manifest, config["teacher_steps"])
    with bundle.updating("distill") as up:
        staged = up.staging_path(STUDENT_FILE)
        torch.save(run.best_state, staged)
        up.add_file(STUDENT_FILE, staged)
        up.manifest.sampler = Samplers(Sampler.STUDENT, student)
        for name, files in stale.items():
            for f in files:
                up.remove_file(f)
            up.manifest.exports.pop(name)
    Checkpoint(checkpoint_dir(bundle.path)).clear()
    kept = "the undistilled weights (nothing beat them)" if best["iteration"] == 0 else f"iteration {best['iteration']}"
    log.info(f"{config['steps']}-step student written to {bundle.path / STUDENT_FILE}: kept {kept}, "
             f"synthetic-defect AUROC {best['auroc']:.3f} vs teacher {teacher_auroc:.3f}; "
             f"{run.iteration} iterations in {run.elapsed / 60:.1f} min")
    if stale:
        log.info(f"removed {len(stale)} export(s) of the samplers distillation changed ({', '.join(stale)}): "
                 f"run inspect export again")
    return {**plain(student), "calibration": _recalibrate(bundle, device)}


def _stale_exports(manifest: Manifest, teacher_steps: int) -> dict[str, list[str]]:
    """Exports whose graph distillation changes: every student export, and teacher exports when the
    teacher sampler's step count changes (load_graph runs the teacher at the distilled-from steps)."""
    previous = manifest.student
    old = (previous and previous.teacher_steps) or (manifest.score.steps if manifest.score else 1)
    return {name: list(rec.files or [name]) for name, rec in manifest.exports.items()
            if rec.sampler != Sampler.TEACHER or old != teacher_steps}


def calibration_folder(cal: Calibration) -> Path | None:
    """The good-image folder a calibration used (None: the training holdout)."""
    return Path(cal.folder) if cal.folder else None


def _recalibrate(bundle: Bundle, device: str) -> dict | None:
    """The score distribution changed with the sampler: a calibrated bundle is calibrated again."""
    cal = bundle.manifest.calibration
    if cal is None:
        log.info(f"not calibrated yet: next, inspect calibrate {bundle.path}")
        return None
    from diffinspect.scoring.calibrate import calibrate

    folder = calibration_folder(cal)
    if folder is not None and not folder.is_dir():
        log.info(f"calibration folder {folder} is gone: re-calibrating on the training holdout instead")
        folder = None
    log.info(f"re-calibrating for the student on {folder or 'the training holdout'} "
             f"(false-reject rate {cal.false_reject_rate:g}), as its scores differ from the teacher's")
    try:
        # torch, not auto: auto self-checks engines against the old calibration's reference scores,
        # which the new sampler cannot reproduce, and any export is gone or stale by now.
        result = calibrate(bundle.path, folder, cal.false_reject_rate, backend="torch", device=device,
                           sampler="student")
    except DiffinspectError as exc:
        # The old statistics describe another sampler; scoring with them would break the bound.
        with Bundle.load(bundle.path).updating("distill", "calibration removed: re-calibration failed") as up:
            up.manifest.calibration = None
        raise DiffinspectError(f"student written, but re-calibration failed ({exc}); the old calibration "
                               f"was removed: run inspect calibrate {bundle.path} GOOD_DIR") from None
    log.info(f"threshold {result.threshold:.4g} on {result.n} images; {result.bound}")
    return {"threshold": result.threshold, "n": result.n, "false_reject_rate": result.false_reject_rate}
