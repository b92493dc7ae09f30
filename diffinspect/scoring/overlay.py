"""What a line engineer sees: the frame, the anomaly heatmap, the outlined defect and the verdict.

Heatmap scaling (fixed, so a colour means the same on every frame of a line): map values are in
calibrated z-units; 0 and below is the coldest colour (blue in JET) and the hottest colour (red) is
reached at 2 x pixel_threshold, so the outlined region (over pixel_threshold) sits mid-scale
(green/yellow) at its border and turns red only where it is clearly over. Without a pixel threshold
the top of the scale is the map's own maximum, but never below 3 z, so a good frame's map (which
rarely passes 3 z) stays cold instead of being stretched into a false alarm.

The heat is blended in proportion to its level, at full strength from the pixel threshold up: where
the map is at or below 0 the photo shows untouched, so a reviewer can see the part (and a missed
defect) instead of a blue wash over the whole frame.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import cv2
import numpy as np

from diffinspect import DiffinspectError

MIN_SIDE = 256  # small frames are upscaled to this so the header text and outlines are readable
# ... but no side ever exceeds this: a thin strip (8 x 20000 px) keeps its shape at a bounded size instead
# of being scaled up by its short side, and a large frame is drawn shrunk, so an overlay's memory and its
# cost are bounded whatever the camera. The heat comes from the model's map (tens of pixels a side), so a
# reviewer loses no part of what the map shows; the photo's own finest detail is in the frame file.
MAX_SIDE = 1024
JPEG_QUALITY = 90  # of a .jpg overlay ([watch] overlay_format = "jpg"): far cheaper to encode than PNG
HOT_FLOOR_Z = 3.0
# BGR header colours; ERROR is amber so it reads as "no verdict", neither pass nor fail.
LABEL_COLOURS = {"ok": (40, 150, 40), "ng": (30, 30, 210), "error": (0, 150, 230)}
UNKNOWN_COLOUR = (110, 110, 110)
CONTOUR_COLOUR = (255, 255, 255)  # white drawn over a black halo: visible on any heat colour
HALO_COLOUR = (0, 0, 0)


_NOT_SAFE = re.compile(r"[^A-Za-z0-9._-]")
STEM_CHARS = 64


def wants_overlay(rule: str, label: str) -> bool:
    """The overlay rule of `inspect score --overlay-dir` and `inspect watch`: all frames with a verdict,
    NG frames only, or none. An error verdict has no score to show: never an overlay."""
    return label != "error" and (rule == "all" or (rule == "ng" and label == "ng"))


def overlay_name(path: str | Path, size: int, mtime_ns: int, fmt: str = "png") -> str:
    """The overlay file name of a frame: `{stem}-{digest}.{fmt}`, the same in `inspect score` and `watch`.

    The digest (sha1 of the frame's identity: absolute path, size, mtime_ns, as watch keys its rows)
    makes it deterministic per frame, so a frame scored again overwrites its own overlay, while frames
    of one name in two folders, or a camera re-using a file name, never share one. The label is left
    out for the same reason: a frame re-scored to another verdict replaces its overlay. The stem is
    only for people: kept to ASCII letters, digits, `.`, `_` and `-` and cut short, so any frame name
    (bytes that are not UTF-8, spaces, names near the file system's length limit) gives a name every
    file system, URL and results row takes; the digest alone keeps names apart."""
    identity = f"{path}|{size}|{mtime_ns}".encode("utf-8", "surrogatepass")  # never raises on odd names
    digest = hashlib.sha1(identity).hexdigest()[:10]
    stem = _NOT_SAFE.sub("_", Path(path).stem)[:STEM_CHARS].lstrip(".")
    return f"{stem}-{digest}.{fmt}"  # write_overlay encodes by the suffix


def render_overlay(frame: np.ndarray, amap: np.ndarray | None, score: float, threshold: float, label: str,
                   pixel_threshold: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """BGR uint8 image (header band on top of the frame) ready for cv2.imwrite.

    frame: uint8 (H, W), (H, W, 1) or (H, W, 3) RGB. amap: 2-D map in z-units covering the whole frame
    (any resolution; use Preprocess.map_to_frame first when an ROI was cropped), or None (COPOD).
    """
    frame = _checked(frame)
    h, w = frame.shape[:2]
    scale = min(max(1, math.ceil(MIN_SIDE / min(h, w))), MAX_SIDE / max(h, w))
    if scale != 1:  # before the colour conversion: everything after works on the drawn size only
        frame = _resized(frame, (max(1, round(w * scale)), max(1, round(h * scale))))
    image = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR if frame.ndim == 2 else cv2.COLOR_RGB2BGR)
    if amap is not None:
        image = _draw_map(image, amap, pixel_threshold, alpha)
    return np.ascontiguousarray(np.vstack([_header(image.shape[1], score, threshold, label), image]))


def write_overlay(path: str | Path, image: np.ndarray) -> Path:
    """Write image at path (parent folders created), as JPEG for a .jpg path, else as PNG; returns the path."""
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DiffinspectError(f"cannot encode overlay for {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Encoding in memory and writing bytes also works for paths cv2.imwrite cannot open (non-ASCII).
        path.write_bytes(buf.tobytes())
    except OSError as exc:
        raise DiffinspectError(f"cannot write overlay {path}: {exc.strerror or exc}") from None
    return path


def save_overlay(path: str | Path, frame: np.ndarray, amap: np.ndarray | None, score: float, threshold: float,
                 label: str, pixel_threshold: float | None = None) -> Path:
    """Render and write one overlay (its format from the path's suffix); amap already on the frame's pixel
    grid. The one overlay writer of `inspect score` and `inspect watch`."""
    return write_overlay(path, render_overlay(frame, amap, score, threshold, label, pixel_threshold))


def _resized(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """frame at size (w, h). Enlarged by nearest neighbour: an engineer should see the real pixels, not
    interpolated blur. Shrunk by area averaging over whole blocks of the largest integer factor (OpenCV's
    fast path; its fractional area path costs many times more), then linearly for the rest (under 2x);
    the last partial block at the right and bottom edge, under one drawn pixel, is left out."""
    w, h = size
    if w > frame.shape[1] or h > frame.shape[0]:
        return cv2.resize(frame, size, interpolation=cv2.INTER_NEAREST)
    k = min(frame.shape[1] // w, frame.shape[0] // h)
    if k > 1:
        bh, bw = frame.shape[0] // k, frame.shape[1] // k
        frame = cv2.resize(frame[:bh * k, :bw * k], (bw, bh), interpolation=cv2.INTER_AREA)
    return cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)


def _checked(frame: np.ndarray) -> np.ndarray:
    """The frame as (H, W) gray or (H, W, 3) RGB uint8, or a clear error."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise DiffinspectError(f"overlay frame must be uint8, got {getattr(frame, 'dtype', type(frame))}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3):
        return frame
    raise DiffinspectError(f"overlay frame must be (H, W), (H, W, 1) or (H, W, 3), got {frame.shape}")


def _draw_map(image: np.ndarray, amap: np.ndarray, pixel_threshold: float | None, alpha: float) -> np.ndarray:
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2 or amap.size == 0:
        raise DiffinspectError(f"anomaly map must be 2-D, got shape {amap.shape}")
    h, w = image.shape[:2]
    # Resized first, then NaN read as 0 (cold), also where it was interpolated into its neighbours.
    amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    cv2.patchNaNs(amap, 0.0)
    np.minimum(amap, np.finfo(np.float32).max, out=amap)  # +inf: the hottest finite value
    if pixel_threshold is not None and pixel_threshold > 0:
        hot = 2.0 * pixel_threshold
    else:
        hot = max(float(amap.max()), HOT_FLOOR_Z)
    level = np.clip(amap * np.float32(255.0 / hot), 0.0, 255.0)
    heat = cv2.applyColorMap(level.astype(np.uint8), cv2.COLORMAP_JET)
    weight = np.clip(level * np.float32(alpha / 127.5), 0.0, alpha)  # full alpha from half-scale up
    out = cv2.blendLinear(image, heat, 1.0 - weight, weight)
    if pixel_threshold is not None:
        mask = (amap > pixel_threshold).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        width = max(1, round(min(h, w) / 200))
        cv2.drawContours(out, contours, -1, HALO_COLOUR, width + 2, cv2.LINE_AA)
        cv2.drawContours(out, contours, -1, CONTOUR_COLOUR, width, cv2.LINE_AA)
    return out


def _header(width: int, score: float, threshold: float, label: str) -> np.ndarray:
    key = str(label).strip().lower()
    text = f"{key.upper() or '?'}   score {_num(score)} / thr {_num(threshold)}"
    height = max(32, round(width * 0.09))
    band = np.empty((height, width, 3), dtype=np.uint8)
    band[:] = LABEL_COLOURS.get(key, UNKNOWN_COLOUR)
    font = cv2.FONT_HERSHEY_SIMPLEX
    # Largest font that fits both the band height and the frame width (long labels shrink, not clip).
    font_scale = height / 45.0
    thick = max(1, round(font_scale * 2))
    (tw, th), base = cv2.getTextSize(text, font, font_scale, thick)
    margin = max(4, height // 5)
    if tw > width - 2 * margin:
        font_scale *= (width - 2 * margin) / tw
        thick = max(1, round(font_scale * 2))
        (tw, th), base = cv2.getTextSize(text, font, font_scale, thick)
    y = (height + th) // 2
    cv2.putText(band, text, (margin, y), font, font_scale, (255, 255, 255), thick, cv2.LINE_AA)
    return band


def _num(x: float) -> str:
    return f"{x:.2f}" if x is not None and math.isfinite(x) else "n/a"
