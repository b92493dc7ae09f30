"""Decoding and preprocessing of frames (OpenCV only, no torch).

Every frame, whatever its file format, bit depth or channel count, becomes a uint8 array of shape
(H, W, C) with C = 1 (gray) or 3 (RGB) before it reaches a model. Preprocessing then crops the ROI
and fits the frame to the model's input (square, or height x width with the frames' aspect ratio).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

# OpenCV's own ceiling on the pixels of one decode: a second guard behind the header check below, for a
# format whose header that check does not parse. OpenCV reads it when it is loaded, so this one import-time
# setting has to stay here, before `import cv2` (setdefault: a user's own value wins).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from diffinspect import DiffinspectError
from diffinspect.vocab import Color, Feed, Resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# A corrupt frame is reported once, by us, as a one-line error; OpenCV's own WARN/ERROR log lines about
# it would only repeat that on stderr (and interleave with `inspect watch`'s output).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
# Every command that reads images refuses a frame above this many megapixels before decoding it (a
# small PNG can declare 60000 x 60000 pixels and take gigabytes to decode). `inspect watch` has a flag.
DEFAULT_MAX_MEGAPIXELS = 50.0
# A frame with a side below this holds too little to score (the classical features and the model's
# resize would invent the rest): it is an error record, in `score`, `watch` and the library alike.
MIN_FRAME_SIDE = 8

# libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size, scaling the DCT blocks as it decodes: a
# fraction of the work where scoring needs far fewer pixels than the frame has (see decode_image). Other
# formats are decoded whole and area-averaged by the same factor, so every format is read at one scale.
REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}

# A model input size: one side (square) or (height, width). Manifests store an int for a square.
ImageSize = int | tuple[int, int]


def input_hw(size: ImageSize | list[int]) -> tuple[int, int]:
    """(height, width) of a model input size given as one side or as (height, width)."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def size_record(size: ImageSize | list[int]) -> int | list[int]:
    """The manifest form of an input size: an int for a square (as bundles always stored it), else [h, w]."""
    h, w = input_hw(size)
    return h if h == w else [h, w]


def parse_size(value: object, what: str = "image_size") -> ImageSize:
    """An input size from a manifest or config: a positive int or [height, width]; else DiffinspectError."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        h, w = int(value[0]), int(value[1])
        return h if h == w else (h, w)
    raise DiffinspectError(f"{what} must be a positive whole number or [height, width], got {value!r}")


class ImageError(DiffinspectError):
    """A frame that cannot be used: unreadable, not an image, too large."""


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def jpeg_reduction(width: int, height: int, min_side: int) -> int:
    """The largest JPEG decode reduction (8, 4 or 2; 1: none) that leaves both sides at least min_side px."""
    return next((r for r in sorted(REDUCED_COLOR, reverse=True) if min(width, height) // r >= min_side), 1)


def at_read_scale(frame: np.ndarray, min_side: int | None) -> np.ndarray:
    """A frame decoded whole, brought to the scale decode_image(min_side=...) reads it at: averaged over
    r x r blocks (INTER_AREA), r from jpeg_reduction, to the size libjpeg's reduced decode gives (sides
    rounded up). What the DCT scaling does, to a JPEG's own error (tests/test_image.py), so a PNG
    calibration set and a JPEG line read alike."""
    h, w = frame.shape[:2]
    r = jpeg_reduction(w, h, min_side) if min_side else 1
    if r == 1:
        return frame
    size = (-(-w // r), -(-h // r))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], *frame.shape[2:])


def decode_image(data: bytes, color: str, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
                 min_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, C), C=1 for gray and 3 for RGB.

    The pixel count is read from the header and checked against `max_megapixels` before anything is
    decoded; formats other than PNG, JPEG, BMP and TIFF are refused (their headers are not checked).
    min_side: the frame is read at 1/2, 1/4 or 1/8 of its size, the most that keeps both sides at least
    min_side px (`jpeg_reduction`): a JPEG reduced by its DCT as it decodes, any other format decoded
    whole, then area-averaged to the same size (`at_read_scale`).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    size = header_size(data)
    if size is None:
        raise ImageError("not a decodable image (not PNG, JPEG, BMP or TIFF, or its header is corrupt)")
    width, height = size
    if max_megapixels is not None and width * height > max_megapixels * 1e6:
        raise ImageError(f"frame of {width}x{height} px ({width * height / 1e6:.1f} MP) exceeds the limit of "
                         f"{max_megapixels:g} MP")
    if min(width, height) < MIN_FRAME_SIDE:
        raise ImageError(f"frame of {width}x{height} px is too small to score (at least {MIN_FRAME_SIDE} px a side)")
    r = jpeg_reduction(width, height, min_side) if min_side and data[:2] == b"\xff\xd8" else 1
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), REDUCED_COLOR.get(r, cv2.IMREAD_UNCHANGED))
    if img is None or img.size == 0:
        raise ImageError("not a decodable image (corrupt, truncated or unsupported format)")
    if img.shape[:2] != (-(-height // r), -(-width // r)):  # the header lied about what follows
        raise ImageError(f"decoded {img.shape[1] * r}x{img.shape[0] * r} px where the header says {width}x{height}")
    img = to_uint8(img, color)
    return at_read_scale(img, min_side) if r == 1 else img


def read_image(path: str | Path, color: str, max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS) -> np.ndarray:
    """Read an image file to uint8 (H, W, C); raise ImageError naming the problem."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer (no effect on regular files).
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            # A device (/dev/zero) or a FIFO would be read forever; a file far larger than any frame
            # within the limit (16-bit RGBA, uncompressed, plus headers) is refused unread.
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{path} is not a regular file")
            if max_megapixels is not None and st.st_size > max_megapixels * 1e6 * 8 + (16 << 20):
                raise ImageError(f"file of {st.st_size / 1e6:.0f} MB is larger than any frame within "
                                 f"{max_megapixels:g} MP")
            data = f.read()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_image(data, color, max_megapixels)


def choose_color(files: list[Path], requested: str) -> str:
    """`auto` is gray when the first readable images carry no colour, else RGB."""
    if requested != "auto":
        return requested
    for f in files[:16]:
        try:
            img = read_image(f, "rgb")
        except ImageError:
            continue
        if not looks_gray(img):
            return "rgb"
    return "gray"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or TIFF header without decoding; None if unrecognised."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            header = struct.unpack("<I", data[14:18])[0]
            if header == 12:  # OS/2 BITMAPCOREHEADER
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)  # a negative height means top-down rows
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except struct.error:  # truncated header
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """Size of the first image (OpenCV decodes the first page)."""
    order = "<" if data[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    found: dict[int, int] = {}
    for k in range(count):
        tag, kind = struct.unpack(order + "HH", data[offset + 2 + 12 * k:offset + 6 + 12 * k])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            value = data[offset + 10 + 12 * k:offset + 14 + 12 * k]
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value[:2] if kind == 3 else value)[0]
    return (found[256], found[257]) if len(found) == 2 else None


def to_uint8(img: np.ndarray, color: str) -> np.ndarray:
    """Bring any decoded OpenCV array (8/16-bit/float, 1/3/4 channels, BGR order) to uint8 gray or RGB."""
    if color not in (Color.GRAY, Color.RGB):
        raise DiffinspectError(f"colour mode must be one of ('gray', 'rgb'), got {color!r}")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)  # alpha dropped
    else:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(convert_color(img, color))


def convert_color(frame: np.ndarray, color: str) -> np.ndarray:
    """A uint8 (H, W, C) gray (C = 1) or RGB (C = 3) frame in colour mode `color`. The one luma
    (OpenCV's 8-bit BT.601 weights) of decoding, scoring and `inspect watch`: a frame decoded once in
    one mode and converted here equals the frame decoded in the other mode, bit for bit."""
    if color == "rgb" and frame.shape[2] == 1:
        return np.repeat(frame, 3, axis=2)
    if color == "gray" and frame.shape[2] == 3:
        return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)[:, :, None]
    return frame


def looks_gray(img_bgr_or_rgb: np.ndarray, tol: int = 3) -> bool:
    """True when a colour image carries no colour (all channels within tol)."""
    if img_bgr_or_rgb.ndim == 2 or img_bgr_or_rgb.shape[2] == 1:
        return True
    c = img_bgr_or_rgb[:, :, :3].astype(np.int16)
    return bool(np.abs(c[:, :, 0] - c[:, :, 1]).max() <= tol and np.abs(c[:, :, 1] - c[:, :, 2]).max() <= tol)


@dataclass(frozen=True)
class Preprocess:
    """How a decoded frame becomes the model's input(s). Stored in the bundle manifest.

    image_size is one side (a square input) or (height, width): `inspect train` chooses the shape from
    the training frames' aspect ratio (train/geometry.py).
    feed "frame": the frame (after the ROI crop) is fitted whole to one image_size input (`fit`).
    feed "tiles": the frame is scaled by tile_scale of its native resolution (`canvas`) and cut into
    image_size tiles overlapping by half (`tile_grid`), so small defects keep their pixels.
    """

    color: Color = Color.GRAY  # gray or rgb (a bundle's colour is never auto)
    image_size: ImageSize = 64
    resize: Resize = Resize.STRETCH  # crop: the centre; pad: letterbox; feed "frame" only
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in frame pixels
    feed: Feed = Feed.FRAME
    tile_scale: float = 0.5  # tiles: canvas side = ROI side x tile_scale

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of one model input."""
        return input_hw(self.image_size)

    def read_side(self, embed_side: int) -> int | None:
        """The fewest pixels a side a frame is read at (decode_image's min_side), the one rule of `inspect
        watch` and of the health profile `inspect calibrate` fits: twice the model input's side and the
        classical embedding's (embed_side), so their area resizes average the same pixels as from the
        whole frame. None (read whole) for tiles (native resolution by design) and an ROI (in frame pixels)."""
        if self.feed != "frame" or self.roi is not None:
            return None
        return 2 * max(*self.hw, embed_side)

    def roi_box(self, frame_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the part of the frame `crop_roi` keeps."""
        fh, fw = frame_shape[:2]
        x, y, w, h = self.roi if self.roi else (0, 0, fw, fh)
        x0, y0 = max(x, 0), max(y, 0)
        return x0, y0, min(x + w, fw) - x0, min(y + h, fh) - y0

    def crop_roi(self, img: np.ndarray) -> np.ndarray:
        if self.roi is None:
            return img
        x, y, w, h = self.roi
        out = img[max(y, 0):y + h, max(x, 0):x + w]
        if out.size == 0:
            raise ImageError(f"ROI {self.roi} lies outside the {img.shape[1]}x{img.shape[0]} frame")
        return out

    def fit(self, img: np.ndarray, size: ImageSize | None = None) -> np.ndarray:
        """ROI-crop and resize a uint8 (H, W, C) frame to (height, width, C) of `size` (default: the model's)."""
        th, tw = input_hw(size or self.image_size)
        img = self.crop_roi(img)
        h, w = img.shape[:2]
        bh, bw, y0, x0 = self.box(h, w, (th, tw))
        if self.resize == "crop":
            img = img[y0:y0 + bh, x0:x0 + bw]
        elif self.resize == "pad":
            img = cv2.copyMakeBorder(img, y0, bh - h - y0, x0, bw - w - x0, cv2.BORDER_REPLICATE)
        interp = cv2.INTER_AREA if img.shape[0] > th and img.shape[1] > tw else cv2.INTER_LINEAR
        out = cv2.resize(img, (tw, th), interpolation=interp)
        if out.ndim == 2:
            out = out[:, :, None]
        return out

    def box(self, height: int, width: int, size: ImageSize | None = None) -> tuple[int, int, int, int]:
        """(box height, box width, y0, x0) of the box of the input's aspect ratio that a `crop` or `pad`
        resize makes of an ROI crop: for crop, the centred box inside it, at (y0, x0); for pad, the box
        around it, the crop at (y0, x0)."""
        th, tw = input_hw(size or self.image_size)
        # Scale of the input box relative to the crop: the largest box inside (crop) or smallest around (pad).
        k = max(height / th, width / tw) if self.resize == "pad" else min(height / th, width / tw)
        bh, bw = max(1, round(th * k)), max(1, round(tw * k))
        bh, bw = (max(bh, height), max(bw, width)) if self.resize == "pad" else (min(bh, height), min(bw, width))
        return bh, bw, abs(height - bh) // 2, abs(width - bw) // 2

    def scaled_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an ROI crop after the tile_scale resize, before any padding."""
        return max(1, round(height * self.tile_scale)), max(1, round(width * self.tile_scale))

    def canvas(self, img: np.ndarray) -> np.ndarray:
        """Tiles feed: ROI crop -> resize by tile_scale -> edge-replicate pad (bottom/right) so the canvas
        holds at least one tile. uint8 (H', W', C)."""
        img = self.crop_roi(img)
        h, w, c = img.shape
        sh, sw = self.scaled_shape(h, w)
        if (sh, sw) != (h, w):
            # INTER_AREA averages the pixels a shrink merges (no aliasing); enlarging is interpolated.
            interp = cv2.INTER_AREA if sh * sw < h * w else cv2.INTER_LINEAR
            img = cv2.resize(img, (sw, sh), interpolation=interp).reshape(sh, sw, c)
        th, tw = self.hw
        if sh < th or sw < tw:
            img = cv2.copyMakeBorder(img, 0, max(th - sh, 0), 0, max(tw - sw, 0), cv2.BORDER_REPLICATE)
            img = img.reshape(max(sh, th), max(sw, tw), c)
        return np.ascontiguousarray(img)

    def tile_grid(self, canvas_shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """Top-left (y, x) of the image_size tiles covering a canvas: stride half a tile, and the last
        row and column flush with the bottom and right edges so every pixel is covered."""
        ys, xs = (_positions(n, side) for n, side in zip(canvas_shape[:2], self.hw, strict=True))
        return [(y, x) for y in ys for x in xs]

    def tiles(self, canvas: np.ndarray) -> np.ndarray:
        """The tiles of a canvas, in `tile_grid` order: (T, H, W, C)."""
        th, tw = self.hw
        return np.stack([canvas[y:y + th, x:x + tw] for y, x in self.tile_grid(canvas.shape)])

    def map_to_frame(self, amap: np.ndarray, frame_shape: tuple[int, ...]) -> np.ndarray:
        """Place an anomaly map back on the frame's pixel grid (inverse of fit, or of canvas for tiles)."""
        fh, fw = frame_shape[:2]
        full = np.full((fh, fw), float(amap.min()), dtype=np.float32)
        x, y, w, h = self.roi_box(frame_shape)
        if self.feed == "tiles":
            sh, sw = self.scaled_shape(h, w)  # the canvas without its padding
            full[y:y + h, x:x + w] = cv2.resize(amap[:sh, :sw], (w, h), interpolation=cv2.INTER_LINEAR)
        elif self.resize == "stretch":
            full[y:y + h, x:x + w] = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
        elif self.resize == "crop":
            bh, bw, y0, x0 = self.box(h, w)
            full[y + y0:y + y0 + bh, x + x0:x + x0 + bw] = cv2.resize(amap, (bw, bh))
        else:
            bh, bw, y0, x0 = self.box(h, w)
            big = cv2.resize(amap, (bw, bh))
            full[y:y + h, x:x + w] = big[y0:y0 + h, x0:x0 + w]
        return full


def _positions(length: int, size: int) -> list[int]:
    if length < size:
        raise ValueError(f"a canvas side of {length} px cannot hold a {size} px tile")
    pos = list(range(0, length - size + 1, max(size // 2, 1)))
    if pos[-1] != length - size:
        pos.append(length - size)
    return pos
