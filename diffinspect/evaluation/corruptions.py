"""Image corruptions for robustness checks: the MNIST-C setting of the paper, read as a line sees it.

Noise (sensor gain), blur (focus drift, vibration), brightness and contrast (lamp ageing, exposure),
JPEG (a camera or gateway that compresses), shift and rotation (part placement). Severity 1..3 goes from
what a stable line sees on a bad day to what a maintenance ticket would be opened for.
"""

from __future__ import annotations

import cv2
import numpy as np

from diffinspect import DiffinspectError

CORRUPTIONS = ("gaussian_noise", "blur", "brightness", "contrast", "jpeg", "shift", "rotate")
SEVERITIES = (1, 2, 3)

# Per-kind parameter for severity 1, 2, 3.
_NOISE_SIGMA = (8.0, 16.0, 32.0)  # grey levels
_BLUR_SIGMA = (1.0, 2.0, 3.5)  # pixels at the frame's resolution
_BRIGHTNESS = (0.12, 0.25, 0.4)  # offset as a share of full scale
_CONTRAST = (0.7, 0.45, 0.25)  # factor towards the mean grey
_JPEG_QUALITY = (40, 20, 8)
_SHIFT = (0.03, 0.06, 0.12)  # share of the frame size
_ROTATE_DEG = (3.0, 7.0, 15.0)


def corrupt(img: np.ndarray, kind: str, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A corrupted copy of a uint8 frame (H, W) or (H, W, C) with C = 1 (gray) or 3 (RGB); same shape.

    rng draws the noise and the direction of shifts and rotations; seed it per frame so every method sees
    the same corrupted image.
    """
    if kind not in CORRUPTIONS:
        raise DiffinspectError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")
    if severity not in SEVERITIES:
        raise DiffinspectError(f"severity must be 1, 2 or 3, got {severity}")
    rng = rng if rng is not None else np.random.default_rng(0)
    s = severity - 1
    x = np.asarray(img)
    if x.dtype != np.uint8:
        raise DiffinspectError(f"corrupt expects a uint8 frame, got {x.dtype}")
    h, w = x.shape[:2]
    if kind == "gaussian_noise":
        out = x.astype(np.float32) + rng.normal(0.0, _NOISE_SIGMA[s], size=x.shape).astype(np.float32)
    elif kind == "blur":
        out = cv2.GaussianBlur(x, (0, 0), _BLUR_SIGMA[s])
    elif kind == "brightness":
        out = x.astype(np.float32) + 255.0 * _BRIGHTNESS[s]
    elif kind == "contrast":
        mean = float(x.mean())
        out = mean + (x.astype(np.float32) - mean) * _CONTRAST[s]
    elif kind == "jpeg":
        out = _jpeg(x, _JPEG_QUALITY[s])
    elif kind == "shift":
        sign = rng.choice([-1.0, 1.0], size=2)
        m = np.float32([[1, 0, sign[0] * _SHIFT[s] * w], [0, 1, sign[1] * _SHIFT[s] * h]])
        # Replicated borders: the camera still sees the fixture around the part, not a black frame.
        out = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    else:
        angle = float(rng.choice([-1.0, 1.0])) * _ROTATE_DEG[s]
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
        out = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # OpenCV drops a trailing channel of size 1; give the caller back the shape it passed.
    return out.reshape(x.shape)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    rgb = x.ndim == 3 and x.shape[2] == 3
    # OpenCV encodes in BGR order; frames here are RGB, so swap for a faithful chroma subsampling.
    src = cv2.cvtColor(x, cv2.COLOR_RGB2BGR) if rgb else x
    ok, buf = cv2.imencode(".jpg", src, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise DiffinspectError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR if rgb else cv2.IMREAD_GRAYSCALE)
    return cv2.cvtColor(dec, cv2.COLOR_BGR2RGB) if rgb else dec
