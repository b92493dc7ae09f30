"""The diffusion detector: preprocessing, batching and the calibrated statistics around a backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.bundle import FrameTermRecord
from diffinspect.data.image import ImageSize, Preprocess, input_hw
from diffinspect.engines import Engine
from diffinspect.engines.exports import CALIBRATION_FILE  # noqa: F401  (the bundle file this detector reads)
from diffinspect.scoring.detector import Scored
from diffinspect.scoring.gaussian import GaussianEmbedding, NearestEmbedding
from diffinspect.scoring.stages import FRAME_TERM, MAP, MODEL, PREPROCESS, Split
from diffinspect.scoring.threshold import min_rank_p, peel_p, tie_break_room
from diffinspect.vocab import FrameDetector, Fusion

if TYPE_CHECKING:
    from diffinspect.scoring.health import HealthProfile


@dataclass
class Stats:
    """Per-pixel normalization of each map term, measured on good images: (K, H, W) float32."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def identity(cls, terms: int, size: ImageSize) -> Stats:
        shape = (terms, *input_hw(size))
        return cls(np.zeros(shape, np.float32), np.ones(shape, np.float32))

    @classmethod
    def fit(cls, raw: np.ndarray, prior: float = 8.0) -> Stats:
        """Mean and std per pixel over raw (N, K, H, W); the variance is shrunk toward each term's
        frame-wide variance (weight `prior` images) so a few calibration images give stable maps."""
        raw = raw.astype(np.float64)
        n = raw.shape[0]
        mean = raw.mean(0)
        var = raw.var(0)
        pooled = var.mean(axis=(1, 2), keepdims=True)
        var = (n * var + prior * pooled) / (n + prior)
        std = np.sqrt(np.maximum(var, 1e-12))
        return cls(mean.astype(np.float32), std.astype(np.float32))


# Per frame in tiles mode: (canvas shape, top-left of each of its tiles); None in frame mode.
Layout = list[tuple[tuple[int, int], list[tuple[int, int]]]] | None


def _with_channels(frame: np.ndarray, channels: int) -> np.ndarray:
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.shape[2] != channels:
        frame = (np.repeat(frame[:, :, :1], 3, axis=2) if channels == 3
                 else frame.mean(2, keepdims=True).astype(np.uint8))
    return frame


def model_inputs(frames: list[np.ndarray], preprocess: Preprocess) -> tuple[np.ndarray, Layout]:
    """Decoded frames of any size -> (M, H, W, C) uint8 model inputs with the model's channel count, and
    the layout that stitches them back: one input per frame (layout None), or in tiles mode every
    tile of every frame, in frame order."""
    channels = 3 if preprocess.color == "rgb" else 1
    frames = [_with_channels(f, channels) for f in frames]
    if preprocess.feed != "tiles":
        return np.stack([preprocess.fit(f) for f in frames]), None
    tiles, layout = [], []
    for f in frames:
        canvas = preprocess.canvas(f)
        layout.append((canvas.shape[:2], preprocess.tile_grid(canvas.shape)))
        tiles.append(preprocess.tiles(canvas))
    return np.concatenate(tiles), layout


def fit_frames(frames: list[np.ndarray], preprocess: Preprocess) -> np.ndarray:
    """The model inputs of `model_inputs` alone: (N, H, W, C), or every frame's tiles in tiles mode."""
    return model_inputs(frames, preprocess)[0]


def stitch(tile_maps: np.ndarray, layout: Layout) -> list[np.ndarray]:
    """Tile maps (T, H, W) -> one canvas map per frame, overlapping tiles averaged."""
    assert layout is not None
    (th, tw), out, i = tile_maps.shape[-2:], [], 0
    for shape, positions in layout:
        total, count = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        for (y, x), amap in zip(positions, tile_maps[i:i + len(positions)], strict=True):
            total[y:y + th, x:x + tw] += amap
            count[y:y + th, x:x + tw] += 1
        out.append(total / count)
        i += len(positions)
    return out


@dataclass
class FrameTerm:
    """The frame-level term: a score of the frame's classical embedding (the fallback's embeddings, by a
    Gaussian or by COPOD), fused with the diffusion score. Whole-frame defects (shading, texture
    drift) that a per-pixel map spreads thin show up here. For sum and max, both scores are put on one
    scale by their median and IQR on the reference images (never on the calibration images, so the
    conformal threshold stays honest). See bench/accuracy.py, bench/fusion.py and the README's ablation."""

    copod: object  # CopodDetector
    weight: float
    diffusion_scale: tuple[float, float]  # (median, IQR) of reference diffusion scores
    copod_scale: tuple[float, float]
    # sum: z_diffusion + weight * z_copod. max: the larger of z_diffusion and weight * z_copod. Either is
    # one fixed function of the frame, thresholded split-conformally on the calibration images: FRR <= a.
    # minp: the full-conformal p-value of the better of the two ranks among the calibration parts, equal
    # ranks ordered by the sum (threshold.min_rank_p): FRR <= a from n >= 1 / a - 1 calibration images.
    # The score is -log p, plus a bounded sum term that orders parts within one p level and never
    # crosses the threshold (bench/fusion.py measures the rules).
    rule: str = "sum"
    calibration: tuple[np.ndarray, np.ndarray] | None = None  # minp: calibration (diffusion, embedding) scores
    # The detector on the fallback's embeddings that gives the term: gaussian (scoring/gaussian.py) or copod.
    detector: str = "copod"
    # minp with the calibration-conditional bound: the p-value is the block of the calibration parts'
    # peel the part falls in (threshold.peel_p), a fixed rejection region, instead of its best rank.
    peeled: bool = False

    def __post_init__(self) -> None:
        if self.detector not in FrameDetector.values():
            raise DiffinspectError(f"unknown frame-term detector {self.detector!r}: expected one of "
                                   f"{FrameDetector.listed()}")
        if self.rule not in Fusion.values():
            raise DiffinspectError(f"unknown frame-term rule {self.rule!r}: expected one of {Fusion.listed()}")
        if self.rule == "minp":
            if self.calibration is None or min(len(c) for c in self.calibration) < 1:
                raise DiffinspectError("the minp frame term needs the calibration scores (run inspect calibrate)")
            d, c = (np.asarray(x, np.float64).ravel() for x in self.calibration)
            if len(d) != len(c):  # one (diffusion, COPOD) pair per calibration part: the ranks need the pairs
                raise DiffinspectError(f"the minp frame term needs paired calibration scores: {len(d)} and {len(c)}")
            self.calibration = (d, c)

    def combine(self, diffusion_scores: np.ndarray, frames: list[np.ndarray]) -> np.ndarray:
        return self.fuse(diffusion_scores, self.embedding_scores(frames))

    def embedding_scores(self, frames: list[np.ndarray]) -> np.ndarray:
        return self._score_embedded(self.copod.embed(frames))  # type: ignore[attr-defined]

    @cached_property
    def _score_embedded(self) -> Callable[[np.ndarray], np.ndarray]:
        return embedding_scorer(self.copod, self.detector)

    def fuse(self, diffusion_scores: np.ndarray, embedding_scores: np.ndarray,
             calibration: np.ndarray | None = None) -> np.ndarray:
        """The fused score from both detectors' scores; minp ranks them among `calibration` (2, n),
        by default the calibration parts."""
        return self.fuse_with_p(diffusion_scores, embedding_scores, calibration)[0]

    def fuse_with_p(self, diffusion_scores: np.ndarray, embedding_scores: np.ndarray,
                    calibration: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(fused score, the rule's own p-value): minp's full-conformal p-value; None for sum and max,
        whose fused score is thresholded split-conformally like any other score."""
        zd = robust_z(diffusion_scores, self.diffusion_scale)
        zc = self.weight * robust_z(embedding_scores, self.copod_scale)
        if self.rule != "minp":
            return (np.maximum(zd, zc) if self.rule == "max" else zd + zc), None
        assert self.calibration is not None
        cal = np.stack(self.calibration) if calibration is None else calibration
        summed = zd + zc
        cal_summed = robust_z(cal[0], self.diffusion_scale) + self.weight * robust_z(cal[1], self.copod_scale)
        new = np.stack([np.asarray(diffusion_scores, np.float64), embedding_scores])
        p = peel_p(cal, new) if self.peeled else min_rank_p(cal, new, cal_summed, summed)
        # Within one p level (parts of equal best rank and order), the summed z orders the score too.
        fused = -np.log(p) + tie_break_room(cal.shape[1]) * (0.5 + np.arctan(summed) / np.pi)
        # A score that is not a number stays one, so the part gets an error record, never a verdict.
        return np.where(np.isfinite(zd) & np.isfinite(zc), fused, np.nan), p

    def held_out_scores(self) -> np.ndarray:
        """minp: each calibration part's fused score among the other calibration parts, which is what a
        new part like it scores (drift alarms compare the line with these)."""
        assert self.calibration is not None
        cal = np.stack(self.calibration)
        return np.array([self.fuse(cal[0, i:i + 1], cal[1, i:i + 1], np.delete(cal, i, axis=1))[0]
                         for i in range(cal.shape[1])])

    def record(self) -> FrameTermRecord:
        return FrameTermRecord(self.weight, self.diffusion_scale, self.copod_scale, Fusion(self.rule),
                               FrameDetector(self.detector))


def embedding_scorer(copod, detector: str) -> Callable[[np.ndarray], np.ndarray]:
    """The frame term's score of classical embeddings: COPOD's own, or a Gaussian or the nearest good
    embeddings on COPOD's fit set."""
    if detector == "copod":
        return copod.score_embeddings
    return (NearestEmbedding if detector == "knn" else GaussianEmbedding)(copod.embeddings).score


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
    return float(q50), float(max(q75 - q25, 1e-9))


def robust_z(values: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    return (np.asarray(values, np.float64) - scale[0]) / scale[1]


class DiffusionDetector:
    name = "diffusion"

    def __init__(self, engine: Engine, preprocess: Preprocess, stats: Stats, threshold: float,
                 pixel_threshold: float | None, calibration_n: int = 0, false_reject_rate: float | None = None,
                 batch_size: int = 16, frame_term: FrameTerm | None = None):
        self.engine = engine
        self.backend = engine.name
        self.preprocess = preprocess
        self.stats = stats
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold
        self.calibration_n = calibration_n
        self.false_reject_rate = false_reject_rate
        self.batch_size = batch_size
        self.frame_term = frame_term
        self.health: HealthProfile | None = None  # set by the loader from the bundle
        self.guarantee: str | None = None  # the threshold's guarantee in words; set by the loader

    def run_fitted(self, fitted: np.ndarray, raw: bool = True) -> tuple[np.ndarray, ...]:
        """(maps, scores, raw) for inputs already at model size, in batches; (maps, scores) without raw,
        which spares the memory of the raw terms of many tiles."""
        keep = 3 if raw else 2
        outs = [self.engine.run(fitted[i:i + self.batch_size], self.stats.mean, self.stats.std)[:keep]
                for i in range(0, len(fitted), self.batch_size)]
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))

    def assemble(self, maps: np.ndarray, scores: np.ndarray, layout: Layout
                 ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
        """Per-input engine outputs -> per-frame (maps, scores): as they are in frame mode; in tiles mode
        canvas maps stitched from the tiles, and the highest score of the frame's tiles (the graph scores
        each tile's sharp map, so a small defect is not diluted by stitching)."""
        if layout is None:
            return maps, scores.astype(np.float64)
        ends = np.cumsum([len(positions) for _, positions in layout])
        frame_scores = [scores[end - len(pos):end].max() for end, (_, pos) in zip(ends, layout, strict=True)]
        return stitch(maps, layout), np.array(frame_scores, np.float64)

    def score(self, frames: list[np.ndarray]) -> Scored:
        split = Split()
        with split(PREPROCESS):
            inputs, layout = model_inputs(frames, self.preprocess)
        with split(MODEL):
            outputs = self.run_fitted(inputs, raw=False)
        with split(MAP):
            maps, scores = self.assemble(*outputs, layout)
        p_values = None
        if self.frame_term is not None:
            with split(FRAME_TERM):
                scores, p_values = self.frame_term.fuse_with_p(scores, self.frame_term.embedding_scores(frames))
        return Scored(scores=scores, maps=maps, p_values=p_values, seconds=split.seconds)
