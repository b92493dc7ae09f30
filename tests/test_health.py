"""The health signals' cheap forms measure what their plain forms measure: profiles fitted before still read.

Each reference below is the plain way to compute a piece (a loop over shifts, the Laplacian of the whole
copy, the colour copy area-resampled before it is made gray); the fast form must agree within a tolerance
far below the spread of good frames, so a health profile fitted by the plain forms stays valid.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from diffinspect.data.synthetic import render_frame
from diffinspect.scoring import health
from diffinspect.scoring.health import MAX_OFFSET, SHARP_SIDE, TILES, measure, pose_profiles


def plain_offset(reference: np.ndarray, profile: np.ndarray) -> float:
    n = profile.size
    corr = []
    for s in range(-MAX_OFFSET, MAX_OFFSET + 1):
        a = reference[max(0, -s):n - max(0, s)]
        b = profile[max(0, s):n - max(0, -s)]
        a, b = a - a.mean(), b - b.mean()
        corr.append(float((a * b).sum()) / math.sqrt(float((a * a).sum() * (b * b).sum()) + 1e-12))
    return float(int(np.argmax(corr)) - MAX_OFFSET)


def plain_sharpness(gray: np.ndarray) -> float:
    g = gray.astype(np.float32)
    lap = cv2.Laplacian(g, cv2.CV_32F)
    h, w = g.shape
    ratios = []
    for i in range(1, TILES - 1):
        for j in range(1, TILES - 1):
            tile = (slice(i * h // TILES, (i + 1) * h // TILES), slice(j * w // TILES, (j + 1) * w // TILES))
            ratios.append((float(lap[tile].var()) + 1e-3) / (float(g[tile].var()) + 1e-3))
    return math.log10(float(np.median(ratios)))


def plain_work_gray(frame: np.ndarray) -> np.ndarray:
    step = max(frame.shape[:2]) // SHARP_SIDE
    if step > 1:
        h, w = frame.shape[:2]
        frame = cv2.resize(frame, (w // step, h // step), interpolation=cv2.INTER_NEAREST)
    scale = SHARP_SIDE / max(frame.shape[:2])
    if scale < 1:
        frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def washer(side: int, seed: int = 0) -> np.ndarray:
    """A 4:3 colour frame of the synthetic washer line."""
    h = side * 3 // 4
    img = render_frame("washer", np.random.default_rng(seed), side)[0]
    return np.ascontiguousarray(img[(side - h) // 2:(side - h) // 2 + h])


def test_offsets_match_the_loop_over_shifts() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = rng.random(128) + 0.5
        b = np.roll(a, int(rng.integers(-20, 21))) + rng.normal(0, rng.uniform(0.05, 1.0), 128)
        assert health.profile_offset(a, b) == plain_offset(a, b)


@pytest.mark.parametrize("side", [320, 640, 1600])
def test_gray_copy_and_sharpness_match_their_plain_forms(side: int) -> None:
    frame = washer(side)
    for f in (frame, cv2.GaussianBlur(frame, (0, 0), side / 400)):
        fast, plain = health._work_gray(f), plain_work_gray(f)
        assert fast.shape == plain.shape
        assert np.abs(fast.astype(int) - plain).max() <= 1  # rounding only: the same linear resampling
        assert abs(health._sharpness(plain) - plain_sharpness(plain)) < 1e-4
        # The whole signal on the fast copy: within a hundredth of a log10 unit.
        assert abs(health._sharpness(fast) - plain_sharpness(plain)) < 0.01


def test_signals_match_those_of_the_plain_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every signal of measure on the fast path against measure on the plain pieces: offsets the same whole
    pixels, the rest within a small fraction of what a blur or a lighting change moves them by."""
    frames = {side: washer(side, seed=side) for side in (640, 2592)}
    cases = {(side, kind): f for side, frame in frames.items()
             for kind, f in (("good", frame), ("moved", np.roll(frame, side // 32, axis=1)),
                             ("blurred", cv2.GaussianBlur(frame, (0, 0), side / 400)),
                             ("darker", (frame * 0.8).astype(np.uint8)))}
    references = {side: pose_profiles(plain_work_gray(f)) for side, f in frames.items()}
    fast = {k: measure(f, references[k[0]]) for k, f in cases.items()}
    monkeypatch.setattr(health, "_work_gray", plain_work_gray)
    monkeypatch.setattr(health, "profile_offset", plain_offset)
    monkeypatch.setattr(health, "_sharpness", plain_sharpness)
    plain = {k: measure(f, references[k[0]]) for k, f in cases.items()}
    for k in cases:
        assert (fast[k]["offset_x"], fast[k]["offset_y"]) == (plain[k]["offset_x"], plain[k]["offset_y"]), k
        assert abs(fast[k]["brightness"] - plain[k]["brightness"]) < 0.05, k
        assert abs(fast[k]["contrast"] - plain[k]["contrast"]) < 0.1, k
        assert abs(fast[k]["sharpness"] - plain[k]["sharpness"]) < 0.01, k
    for side in frames:  # what the tolerances are small against
        assert plain[(side, "moved")]["offset_x"] > 0
        assert plain[(side, "good")]["sharpness"] - plain[(side, "blurred")]["sharpness"] > 0.1
        assert plain[(side, "good")]["brightness"] - plain[(side, "darker")]["brightness"] > 10
