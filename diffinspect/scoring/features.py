"""Classical frame embeddings that need no trained model (cold start and the COPOD fallback).

One fixed-length float32 vector per frame, built from cheap OpenCV/numpy statistics that move when a
part changes: colour moments and per-cell means (global and local colour/brightness), gradient
orientation histograms per cell (edges, shape), a rotation-invariant uniform LBP histogram (texture),
radial FFT band energies (texture scale, blur) and tail statistics of the residual against a median
blur (small spots and scratches, which barely move any average).

The statistics are taken at three scales (the feature size, its half and its quarter), each from the
one resized copy: a blowhole or a crack that moves no statistic of the 128 px square stands out against
the coarser texture of the 32 px one, and the nearest good parts (scoring/gaussian.py) see it there
(bench/frame_detectors.py; the README's ablation).

The length depends only on the recipe, not on the frame's size or channel count: gray frames get the
same vector layout as RGB frames, with the two chroma channels at zero. Change FEATURE_VERSION
whenever the recipe changes: stored fallback embeddings are only comparable with the recipe that made
them, so the fallback records its version and older versions are still computed for older bundles.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from diffinspect import DiffinspectError
from diffinspect.data.image import convert_color

FEATURE_VERSION = 2
# The scales of each recipe version, as divisors of the feature size (version 1: the feature size only).
SCALES = {1: (1,), 2: (1, 2, 4)}
FEATURE_SIZE = 128  # the square side a frame is embedded at (its half and quarter join it in recipe v2)
GRID = 4  # cells per side for local statistics: a 4x4 grid localizes changes to 1/16 of the frame
HOG_BINS = 4  # unsigned orientations, 45 degrees each: enough for edge direction, few dims
FFT_BANDS = 8
LBP_BINS = 10  # rotation-invariant uniform LBP with 8 neighbours: codes 0..8, plus 9 = non-uniform
MEDIAN_KSIZES = (5, 15)  # residual scales: 5 px for scratches and dust, 15 px for blobs (at 128 px)
TAIL_QUANTILES = (99.0, 99.9, 100.0)
MIN_SIZE = 32

# The 8 LBP neighbours in circular order (dy, dx), so bit transitions can be counted around the ring.
_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def embedding_dim(version: int = FEATURE_VERSION) -> int:
    """Length of classical_embedding's output (the same for every frame size and channel count)."""
    return SCALE_DIM * len(_scales(version))


def _scales(version: int) -> tuple[int, ...]:
    if version not in SCALES:
        raise DiffinspectError(f"unknown classical feature recipe v{version}: this version computes "
                               f"{', '.join(f'v{v}' for v in SCALES)}")
    return SCALES[version]


def _scale_dim() -> int:
    """The statistics of one scale; the feature size's own come first in every version."""
    cells = GRID * GRID
    colour = 3 * 3 + 3 * cells + cells  # moments, cell means per channel, luma cell std
    gradient = HOG_BINS * cells + cells  # per-cell orientation histograms, per-cell magnitude
    tails = 2 * len(MEDIAN_KSIZES) * len(TAIL_QUANTILES) + len(MEDIAN_KSIZES) * cells + len(TAIL_QUANTILES)
    return colour + gradient + LBP_BINS + FFT_BANDS + tails


SCALE_DIM = _scale_dim()


def classical_embedding(frame: np.ndarray, size: int = FEATURE_SIZE, version: int = FEATURE_VERSION) -> np.ndarray:
    """Embed one uint8 (H, W, C) frame, C = 1 (gray) or 3 (RGB), of any size, as float32 (D,)."""
    square = _resize(_check_frame(frame), size)
    # The smaller scales come from the square copy: one pass over a large frame, whatever the scales.
    return np.concatenate([_statistics(square if d == 1 else _resize(square, max(MIN_SIZE, size // d)))
                           for d in _scales(version)])


def _statistics(square: np.ndarray) -> np.ndarray:
    luma, chroma = _channels(square)
    gray8 = np.clip(luma * 255.0 + 0.5, 0, 255).astype(np.uint8)  # exact: luma is 8-bit / 255
    parts = [
        *_colour_stats(luma, chroma),
        *_gradient_histograms(luma),
        _lbp_histogram(gray8),
        _fft_bands(luma),
        *_residual_tails(gray8, chroma),
    ]
    out = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts]).astype(np.float32)
    # A NaN would poison every ECDF it touches; the recipe never makes one, so this guards regressions.
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def embed_frames(frames: list[np.ndarray], size: int = FEATURE_SIZE, version: int = FEATURE_VERSION) -> np.ndarray:
    """Embed frames to (N, D) float32; N = 0 gives a (0, D) array."""
    out = np.empty((len(frames), embedding_dim(version)), dtype=np.float32)
    for i, frame in enumerate(frames):
        out[i] = classical_embedding(frame, size, version)
    return out


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise DiffinspectError(f"frames must be uint8 arrays, got {getattr(frame, 'dtype', type(frame))}")
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3) or min(frame.shape[:2]) < 1:
        raise DiffinspectError(f"frames must be (H, W, 1) or (H, W, 3), got shape {frame.shape}")
    return frame


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    if size < MIN_SIZE:
        raise DiffinspectError(f"feature size must be at least {MIN_SIZE} px, got {size}")
    # INTER_AREA averages when shrinking (no aliasing of fine texture into false patterns).
    interp = cv2.INTER_AREA if min(frame.shape[:2]) > size else cv2.INTER_LINEAR
    out = cv2.resize(frame, (size, size), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def _channels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luma in [0, 1] and two opponent chroma channels (zero for gray), float32."""
    if img.shape[2] == 1:
        luma = img[:, :, 0].astype(np.float32) * np.float32(1.0 / 255.0)
        return luma, np.zeros((2, *luma.shape), dtype=np.float32)
    # The 8-bit luma of decoding: a gray picture stored as three equal channels gives exactly its gray
    # values, so it embeds exactly like the same picture stored as one channel.
    luma = convert_color(img, "gray")[:, :, 0].astype(np.float32) * np.float32(1.0 / 255.0)
    x = img.astype(np.float32) * np.float32(1.0 / 255.0)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    # Opponent channels decorrelate colour from brightness, so a lighting change moves luma only.
    return luma, np.stack([r - g, 0.5 * (r + g) - b])


def _cells(x: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """Reduce a (S, S) map over a GRID x GRID cell grid with ufunc (np.add, np.maximum)."""
    edges = np.arange(GRID) * x.shape[0] // GRID
    return ufunc.reduceat(ufunc.reduceat(x, edges, axis=0), edges, axis=1)


def _cell_area(size: int) -> np.ndarray:
    edges = np.append(np.arange(GRID) * size // GRID, size)
    side = np.diff(edges).astype(np.float64)
    return np.outer(side, side)


def _moments(x: np.ndarray) -> tuple[float, float, float]:
    mean = float(x.mean(dtype=np.float64))
    d = x - np.float32(mean)
    d2 = d * d
    std = float(np.sqrt(d2.mean(dtype=np.float64)))
    # A flat channel (e.g. chroma of a gray frame) has no defined skew; 0 keeps the layout fixed.
    skew = float((d2 * d).mean(dtype=np.float64) / std ** 3) if std > 1e-6 else 0.0
    return mean, std, skew


def _colour_stats(luma: np.ndarray, chroma: np.ndarray) -> list[np.ndarray]:
    area = _cell_area(luma.shape[0])
    feats = [np.array([m for ch in (luma, *chroma) for m in _moments(ch)])]
    for ch in (luma, *chroma):
        feats.append(_cells(ch.astype(np.float64), np.add) / area)
    lum = luma.astype(np.float64)
    mean = feats[1]
    var = _cells(lum * lum, np.add) / area - mean * mean
    feats.append(np.sqrt(np.maximum(var, 0.0)))
    return feats


def _gradient_histograms(luma: np.ndarray) -> list[np.ndarray]:
    gx = cv2.Sobel(luma, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(luma, cv2.CV_32F, 0, 1, ksize=3)
    mag, ang = cv2.cartToPolar(gx, gy, angleInDegrees=True)
    # Unsigned orientation: a dark-to-bright edge and a bright-to-dark edge at the same angle agree,
    # so the histogram describes shape rather than which side of an edge is brighter.
    bins = (np.floor(ang * (HOG_BINS / 180.0)).astype(np.int32)) % HOG_BINS
    size = luma.shape[0]
    cell_of = (np.arange(size) * GRID // size).astype(np.int32)
    cell = cell_of[:, None] * GRID + cell_of[None, :]
    hist = np.bincount((cell * HOG_BINS + bins).ravel(), weights=mag.ravel(),
                       minlength=GRID * GRID * HOG_BINS).reshape(GRID * GRID, HOG_BINS)
    total = hist.sum(axis=1, keepdims=True)
    # Normalize per cell so contrast does not dominate shape, but damp flat cells (whose orientation
    # histogram is pure noise) by adding a fraction of the frame's average cell energy.
    damp = 0.1 * float(total.mean()) + 1e-6
    return [hist / (total + damp), np.log1p(total.ravel() / _cell_area(size).ravel() * 100.0)]


def _lbp_histogram(gray8: np.ndarray) -> np.ndarray:
    g = gray8.astype(np.int16)
    centre = g[1:-1, 1:-1]
    h, w = centre.shape
    bits = np.stack([g[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] >= centre for dy, dx in _RING])
    ones = bits.sum(axis=0)
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(axis=0)
    # Uniform patterns (at most 2 bit transitions around the ring) are edges, corners, spots and flats;
    # counting ones makes them rotation invariant; everything else shares the last bin.
    code = np.where(transitions <= 2, ones, LBP_BINS - 1)
    return np.bincount(code.ravel(), minlength=LBP_BINS) / code.size


@lru_cache(maxsize=8)
def _fft_plan(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann window and band index of every rfft2 coefficient, for one frame size."""
    window = cv2.createHanningWindow((size, size), cv2.CV_32F)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fy * fy + fx * fx)
    # Log-spaced bands from the lowest non-DC frequency to Nyquist: texture scales are multiplicative.
    edges = np.geomspace(1.0 / size, 0.5, FFT_BANDS + 1)
    band = np.clip(np.searchsorted(edges, radius, side="right") - 1, -1, FFT_BANDS - 1)
    band[0, 0] = -1  # DC is the mean brightness, already a colour moment
    return window, band


def _fft_bands(luma: np.ndarray) -> np.ndarray:
    window, band = _fft_plan(luma.shape[0])
    # The window stops the frame border from leaking a strong cross into every band.
    power = np.abs(np.fft.rfft2((luma - luma.mean()) * window)) ** 2
    keep = band >= 0
    energy = np.bincount(band[keep], weights=power[keep], minlength=FFT_BANDS)
    count = np.bincount(band[keep], minlength=FFT_BANDS)
    return np.log(energy / np.maximum(count, 1) + 1e-8)


def _quantiles_u8(values: np.ndarray) -> np.ndarray:
    """TAIL_QUANTILES of integer values in 0..255, equal to np.percentile's linear rule.

    A 256-bin histogram replaces the partial sort np.percentile does, which is far slower.
    """
    cum = np.cumsum(np.bincount(values.ravel(), minlength=256))
    pos = np.asarray(TAIL_QUANTILES) / 100.0 * (cum[-1] - 1)
    lo, hi = np.floor(pos), np.ceil(pos)
    v_lo = np.searchsorted(cum, lo, side="right")  # value of the lo-th smallest (0-based)
    v_hi = np.searchsorted(cum, hi, side="right")
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _residual_tails(gray8: np.ndarray, chroma: np.ndarray) -> list[np.ndarray]:
    feats = []
    for k in MEDIAN_KSIZES:
        # The median follows texture and edges wider than k/2 but not a spot or line narrower than
        # that, so the residual's upper tail is where small defects live. Bright and dark are kept
        # apart: a white speck and a dark pit are different failures. Tails are divided by the mean
        # absolute residual, so they measure "unusual for this frame's own texture": a rougher or
        # smoother good part moves the scale, a spot moves the tail.
        residual = gray8.astype(np.int16) - cv2.medianBlur(gray8, k).astype(np.int16)
        absres = np.abs(residual)
        scale = float(absres.mean()) + 1.0
        feats.append(_quantiles_u8(np.maximum(residual, 0)) / scale)
        feats.append(_quantiles_u8(np.maximum(-residual, 0)) / scale)
        feats.append(_cells(absres, np.maximum).astype(np.float64) / scale)
    # Colour specks: residual of the chroma magnitude (zero for gray frames).
    cmag = np.sqrt(chroma[0] ** 2 + chroma[1] ** 2)
    cmag8 = np.clip(cmag * 255.0 + 0.5, 0, 255).astype(np.uint8)
    cres = np.abs(cmag8.astype(np.int16) - cv2.medianBlur(cmag8, MEDIAN_KSIZES[0]).astype(np.int16))
    feats.append(_quantiles_u8(cres) / (float(cres.mean()) + 1.0))
    return feats
