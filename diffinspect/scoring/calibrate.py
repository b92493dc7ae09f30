"""Calibration from good parts only: normalization statistics, the conformal threshold, the fallback.

Two disjoint sets of good images keep the threshold honest:
- reference images (the training images, when still on disk) give the per-pixel statistics;
- calibration images (a folder the user names, else the training holdout) give the scores whose
  conformal quantile is the threshold. Their scores are exchangeable with new good parts' scores because
  nothing was fitted on them, so the false-reject bound holds.
When the training images are gone, the calibration images are split: 30 % for statistics, the rest
for scores.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import Bundle, BundleUpdate, Calibration, Fallback, Training
from diffinspect.data.datasets import list_images
from diffinspect.data.image import Preprocess
from diffinspect.data.reading import read_images
from diffinspect.engines.select import make_engine
from diffinspect.logs import Progress
from diffinspect.scoring.diffusion import (
    CALIBRATION_FILE,
    DiffusionDetector,
    FrameTerm,
    Stats,
    embedding_scorer,
    fit_frames,
    robust_scale,
)
from diffinspect.scoring.features import FEATURE_SIZE
from diffinspect.scoring.health import fit_health, save_health
from diffinspect.scoring.suspects import RULE, SUSPECTS_FILE, Suspect, find_suspects, suspects_json
from diffinspect.scoring.suspects import describe as describe_suspects
from diffinspect.scoring.threshold import (
    RULES,
    check_calibration_size,
    conditional_threshold,
    conformal_threshold,
    describe_bound,
    level_threshold,
    min_calibration_size,
    min_rank_threshold,
    peel_blocks,
)
from diffinspect.vocab import FrameDetector, Fusion, Sampler

MAX_REFERENCE = 256
MAX_EMBEDDING_FIT = 4096  # training images the embedding detectors are fitted on
MAX_REFERENCE_INPUTS = 2048  # model inputs (frames or tiles) for the statistics: bounds raw-term memory
SELFCHECK_FRAMES = 4

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    n: int
    n_reference: int
    source: str
    threshold: float
    pixel_threshold: float
    false_reject_rate: float
    backend: str
    copod_threshold: float | None
    rule: str = "split"  # threshold.RULES: "best-rank" when the fused p-value set it
    delta: float | None = None  # set: the calibration-conditional threshold (confidence 1 - delta)
    why_average: str | None = None  # why the conditional bound asked for does not hold, when it does not

    @property
    def bound(self) -> str:
        said = describe_bound(self.n, self.false_reject_rate, self.rule, self.delta)
        return said if self.why_average is None else f"{said}; {self.why_average}"


def image_sets(bundle: Bundle, normal_dir: str | Path | None, seed: int = 0
               ) -> tuple[list[Path], list[Path], str]:
    """(reference paths, calibration paths, description of the calibration source)."""
    training = bundle.manifest.training or Training()
    reference = training.paths_on_disk()
    if normal_dir is not None:
        calib = list_images(normal_dir)
        if not calib:
            raise DiffinspectError(f"no images found under {normal_dir}")
        described = f"{len(calib)} good images from {normal_dir}"
    else:
        calib = training.paths_on_disk(held_out=True)
        if not calib:
            raise DiffinspectError(
                f"bundle {bundle.path} has no held-out good images on disk: name a folder of good images "
                f"(inspect calibrate {bundle.path} GOOD_DIR)")
        described = f"{len(calib)} good images held back from training ({training.source})"
    # Good images added since training: reviewed good parts are scored for the threshold; the images a
    # fine-tune learnt from give statistics like the training images.
    added = bundle.added_paths("calibration")
    if added:
        calib = calib + added
        described += f" and {len(added)} added to the bundle (reviewed good parts)"
    reference = reference + bundle.added_paths("training")
    if not reference:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(calib))
        cut = max(4, int(0.3 * len(calib)))
        reference = sorted(calib[i] for i in order[:cut])
        calib = sorted(calib[i] for i in order[cut:])
        described += f", split {len(reference)} for statistics / {len(calib)} for the threshold"
    else:
        reference = _sample(reference, MAX_REFERENCE, seed)
    return reference, calib, described


def _sample(paths: list[Path], limit: int, seed: int = 0) -> list[Path]:
    """At most `limit` of the paths, drawn at random (seeded), in their order."""
    if len(paths) <= limit:
        return paths
    return [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), limit, replace=False))]


def calibrate(
    bundle_path: str | Path,
    normal_dir: str | Path | None = None,
    false_reject_rate: float = 0.01,
    backend: str = "auto",
    device: str = "auto",
    sampler: str | None = None,
    fallback: bool = True,
    progress: Progress | None = None,
    fusion: str | None = None,
    frame_detector: str | None = None,
    confidence: float | None = 0.95,
    exclude_suspects: bool = False,
    _excluded: tuple[Suspect, ...] = (),
) -> CalibrationResult:
    """fusion (Fusion) and frame_detector (FrameDetector): how the frame-level term is made and
    joins the diffusion score; kept in the bundle's recipe. None keeps the recipe's.

    confidence: the threshold is the calibration-conditional one (with this confidence, this threshold
    rejects at most false_reject_rate of good parts) where there are enough images (the minp fusion peels
    the calibration parts, threshold.peel_p); otherwise the marginal (average) bound holds, and the result
    says why. None asks for the marginal bound.
    exclude_suspects: calibrate again without the calibration images that look defective (suspects.py)."""
    if confidence is not None and not 0.5 <= confidence < 1:
        raise DiffinspectError(f"--confidence must be at least 0.5 and below 1, got {confidence}")
    for flag, value, allowed in (("--fusion", fusion, Fusion), ("--frame-detector", frame_detector, FrameDetector)):
        if value is not None and value not in allowed.values():
            raise DiffinspectError(f"{flag} must be one of {allowed.listed()}, got {value!r}")
    bundle = Bundle.load(bundle_path)
    prep = bundle.manifest.preprocess
    reference, calib, described = image_sets(bundle, normal_dir)
    if _excluded:
        dropped = {s.image for s in _excluded}
        calib = [p for p in calib if str(p) not in dropped]
        described += f", {len(_excluded)} suspect(s) excluded"
    check_calibration_size(len(calib), false_reject_rate,
                           hint="name a folder with more good images, or raise --false-reject-rate")
    log.info(f"calibrating on {described}")
    ref_frames = read_images(reference, prep.color, "reference images", progress=progress).frames
    cal_read = read_images(calib, prep.color, "calibration images", progress=progress)
    cal_frames = cal_read.frames

    engine = make_engine(bundle, backend, device, sampler)
    size = prep.image_size
    probe = DiffusionDetector(engine, prep, Stats.identity(len(engine.term_names), size), 0.0, None)
    # Statistics per input pixel: over frames, or in tiles mode over the reference frames' tiles.
    ref_inputs = fit_frames(ref_frames, prep)
    if len(ref_inputs) > MAX_REFERENCE_INPUTS:
        keep = np.random.default_rng(0).choice(len(ref_inputs), MAX_REFERENCE_INPUTS, replace=False)
        ref_inputs = ref_inputs[np.sort(keep)]
    raw = _batched(probe, ref_inputs, "statistics", progress)[2]
    stats = Stats.fit(raw)
    detector = DiffusionDetector(engine, prep, stats, 0.0, None)
    # Conformal scores per frame (tiles stitched), as `score` will compute them on the line.
    scores, map_max = _score_frames(detector, cal_frames, "scoring calibration images", progress)
    # Overlays outline pixels above the conformal threshold of per-image map maxima: a good part shows
    # an outlined region with probability at most the same rate.
    pixel_threshold = conformal_threshold(map_max, false_reject_rate)
    # Self-check references are model inputs (whole frames, or the first tiles) with the engine's own
    # scores for them, so a backend is checked on exactly what it computes.
    selfcheck = fit_frames(cal_frames[:SELFCHECK_FRAMES], prep)[:SELFCHECK_FRAMES]
    selfcheck_scores = detector.run_fitted(selfcheck, raw=False)[1]
    copod = (_fit_fallback(_embedding_fit_paths(bundle, reference), cal_frames, prep, false_reject_rate, progress)
             if fallback else None)
    frame_term = None
    recipe = replace(bundle.recipe, fusion=Fusion(fusion or bundle.recipe.fusion),
                     frame_detector=FrameDetector(frame_detector or bundle.recipe.frame_detector))
    weight = recipe.classical_weight
    n = len(scores)
    delta, why_average = _conditional(n, false_reject_rate, confidence)
    if copod is not None and weight > 0:
        ref_scores = _score_frames(detector, ref_frames, "scoring reference images", progress)[0]
        score_embedded = embedding_scorer(copod, recipe.frame_detector)
        cal_embedded = score_embedded(copod.calibration_embeddings)
        minp = recipe.fusion == "minp"
        frame_term = FrameTerm(copod, weight, robust_scale(ref_scores), robust_scale(score_embedded(copod.embeddings)),
                               recipe.fusion, (scores, cal_embedded) if minp else None,
                               recipe.frame_detector, peeled=minp and delta is not None)
        scores = frame_term.held_out_scores() if minp else frame_term.fuse(scores, cal_embedded)
    rule = "best-rank" if frame_term is not None and frame_term.rule == "minp" else "split"
    if rule == "best-rank":
        assert frame_term is not None and frame_term.calibration is not None
        fused = frame_term.calibration
        threshold = (min_rank_threshold(n, false_reject_rate) if delta is None
                     else level_threshold(n, peel_blocks(n, false_reject_rate, delta)))
    else:
        fused = (np.zeros(0), np.zeros(0))
        threshold = (conformal_threshold(scores, false_reject_rate) if delta is None
                     else conditional_threshold(scores, false_reject_rate, delta))
    found = find_suspects(scores, [str(p) for p in cal_read.paths])
    if exclude_suspects and found:
        log.info(f"{len(found)} suspect calibration image(s) ({RULE}): calibrating again without them")
        return calibrate(bundle_path, normal_dir, false_reject_rate, backend, device, sampler, fallback, progress,
                         fusion, frame_detector, confidence, _excluded=(*_excluded, *found))
    for line in describe_suspects(found, list(_excluded)):
        log.info(line)
    # Health ranges and score quantiles on the calibration frames: what drift alarms compare the line to.
    cal_scores = {detector.name: scores}
    if copod is not None and copod.calibration_scores is not None:
        cal_scores[copod.name] = copod.calibration_scores
    # Read at the scale watch reads the line's frames at (Preprocess.read_side), which the profile records.
    fallback = copod or bundle.manifest.fallback  # the fallback watch loads
    embed = fallback.feature_size if fallback else FEATURE_SIZE
    health = fit_health(cal_frames, cal_scores, prep.read_side(embed))

    buf = io.BytesIO()
    np.savez(buf, mean=stats.mean, std=stats.std, terms=np.array(engine.term_names), scores=scores,
             fusion_diffusion=fused[0], fusion_copod=fused[1],
             map_max=map_max, selfcheck_frames=selfcheck, selfcheck_scores=selfcheck_scores)
    copod_record = None
    with bundle.updating("calibrate") as up:
        up.write_bytes(CALIBRATION_FILE, buf.getvalue())
        up.write_bytes(SUSPECTS_FILE, suspects_json(found, list(_excluded)))
        if copod is not None:
            copod_record = _save_fallback(up, copod)
        up.manifest.score = recipe
        up.manifest.calibration = Calibration(
            threshold=threshold, pixel_threshold=pixel_threshold, false_reject_rate=false_reject_rate,
            n=len(scores), n_reference=len(ref_frames), source=described,
            folder=str(Path(normal_dir).resolve()) if normal_dir else None, backend=engine.name,
            sampler=Sampler(sampler or bundle.manifest.sampler.default),
            score_stats={"mean": float(scores.mean()), "std": float(scores.std()), "max": float(scores.max()),
                         "median": float(np.median(scores))},
            terms=list(engine.term_names), rule=RULES[rule, delta is not None],
            confidence=None if delta is None else 1 - delta,
            frame_term=frame_term.record() if frame_term else None)
        if copod_record is not None:
            up.manifest.fallback = copod_record
        save_health(up, health)
    return CalibrationResult(len(scores), len(ref_frames), described, threshold, pixel_threshold,
                             false_reject_rate, engine.name, copod_record.threshold if copod_record else None,
                             rule, delta, why_average)


def _conditional(n: int, alpha: float, confidence: float | None) -> tuple[float | None, str | None]:
    """(delta of the calibration-conditional threshold, or None; why only the average bound holds)."""
    if confidence is None:
        return None, None
    delta = 1 - confidence
    need = min_calibration_size(alpha, delta)
    if n < need:
        return None, f"the {confidence:.0%} bound for this threshold needs at least {need} good images, here {n}"
    return delta, None


def _batched(detector: DiffusionDetector, fitted: np.ndarray, what: str, progress: Progress | None):
    parts, step = [], detector.batch_size
    for i in range(0, len(fitted), step):
        parts.append(detector.run_fitted(fitted[i:i + step]))
        if progress:
            progress(what, min(i + step, len(fitted)), len(fitted))
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def _score_frames(detector: DiffusionDetector, frames: list[np.ndarray], what: str, progress: Progress | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(image score, map maximum) per frame; only these are kept, as the maps of many large frames
    would not fit in memory."""
    scores, peaks, step = [], [], detector.batch_size
    for i in range(0, len(frames), step):
        out = detector.score(frames[i:i + step])
        scores.append(out.scores)
        peaks += [float(np.max(m)) for m in out.maps]
        if progress:
            progress(what, min(i + step, len(frames)), len(frames))
    return np.concatenate(scores), np.array(peaks)


def _embedding_fit_paths(bundle: Bundle, reference: list[Path]) -> list[Path]:
    """Every training image still on disk (up to MAX_EMBEDDING_FIT), else the reference images: the
    embedding detectors gain from each good part they see (README, accuracy), and an embedding is cheap
    next to a diffusion pass."""
    training = (bundle.manifest.training or Training()).paths_on_disk() + bundle.added_paths("training")
    return _sample(training, MAX_EMBEDDING_FIT) or reference


def _fit_fallback(fit_paths: list[Path], cal_frames, prep: Preprocess, rate: float, progress: Progress | None):
    """COPOD on classical embeddings: fitted on good images that are not calibration images (the
    training images), thresholded on the calibration images (the same split as the diffusion
    detector, so its bound holds too). The images are embedded as they are read: none is kept."""
    from diffinspect.scoring.copod import CopodDetector
    from diffinspect.scoring.features import classical_embedding

    read = read_images(fit_paths, prep.color, "embedding fit images", progress=progress,
                       transform=lambda f: classical_embedding(prep.crop_roi(f)))
    if len(read.frames) < 2:
        raise DiffinspectError(f"{len(read.frames)} readable good images to fit the embedding detectors: need 2")
    copod = CopodDetector(np.stack(read.frames), 0.0, prep, false_reject_rate=rate, n_calibration=len(cal_frames))
    copod.calibration_embeddings = copod.embed(cal_frames)
    copod.calibration_scores = copod.score_embeddings(copod.calibration_embeddings)
    copod.threshold = conformal_threshold(copod.calibration_scores, rate)
    return copod


def _save_fallback(up: BundleUpdate, copod) -> Fallback:
    from diffinspect.scoring.copod import SCORES_FILE, scores_npy

    with tempfile.TemporaryDirectory() as tmp:
        record = copod.save(tmp)
        staged = up.staging_path(record.file)
        shutil.move(Path(tmp) / record.file, staged)
    up.add_file(record.file, staged)
    up.write_bytes(SCORES_FILE, scores_npy(copod.calibration_scores))
    return record
