"""One frame of `inspect watch`: its identity, reading its bytes safely, and its state in flight.

A frame is identified by (absolute path, size, mtime_ns), not by the path alone: a camera that reuses
a file name after the old frame was moved away (or overwrites it in place) produces a new frame that
must get its own row, while an unchanged file seen again after a restart is the same frame.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffinspect.data.image import ImageError
from diffinspect.scoring.inspector import Inspector, Verdict


@dataclass
class Candidate:
    """A complete file, ready to be read and scored."""

    path: Path
    folder: Path
    size: int
    mtime_ns: int
    received_at: float  # wall clock when the watcher first saw the file
    settled: bool = False  # unchanged for settle_ms: decode even if the tail looks incomplete

    @property
    def key(self) -> tuple[str, int, int]:
        return (str(self.path), self.size, self.mtime_ns)


class FrameChanged(Exception):
    """The file changed between the completeness check and the read: check it again."""


# ---------------------------------------------------------------------------------------------
# Reading one frame


def read_frame(cand: Candidate, max_bytes: int | None) -> bytes:
    """The file's bytes, exactly as they were when it was found complete.

    Raises ImageError (the frame gets an error row) or FrameChanged (check completeness again)."""
    path = str(cand.path)
    _check_file(cand, path, max_bytes)
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check must not hang the line.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise FrameChanged from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from None
    try:
        before = os.fstat(fd)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
        after = os.fstat(fd)
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    # Same size and mtime before, during and after the read: a consistent snapshot of that frame.
    seen = {(before.st_size, before.st_mtime_ns), (after.st_size, after.st_mtime_ns)}
    if seen != {(cand.size, cand.mtime_ns)} or len(data) != cand.size:
        raise FrameChanged
    return data


def _check_file(cand: Candidate, path: str, max_bytes: int | None) -> None:
    """Refuse what is not a plain frame file of the watched folder before opening it."""
    # Only the file itself can be a link: neither os.walk nor inotify follow linked folders.
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not _inside(real, str(cand.folder)):
            raise ImageError(f"symlink pointing outside the watched folder (to {real})")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(f"broken symlink (to {os.readlink(path)})") from None
        raise FrameChanged from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file")  # a FIFO would block the reader forever
    if max_bytes is not None and st.st_size > max_bytes:
        raise ImageError(f"file of {st.st_size / 1e6:.0f} MB is larger than any frame within the "
                         f"megapixel limit")


@functools.lru_cache(maxsize=64)
def _real_root(folder: str) -> str:
    return os.path.realpath(folder)


def _inside(real: str, folder: str) -> bool:
    if os.path.commonpath([real, _real_root(folder)]) == _real_root(folder):
        return True
    _real_root.cache_clear()  # the folder itself may be a link that was re-pointed (a re-mount)
    return os.path.commonpath([real, _real_root(folder)]) == _real_root(folder)


def looks_complete(data: bytes) -> bool:
    """False when the bytes look like the first part of a PNG, JPEG or BMP still being written."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        end = data.rfind(b"IEND", max(0, len(data) - 64))
        return end >= 0 and len(data) >= end + 8  # the chunk type, then its 4-byte CRC
    if data.startswith(b"\xff\xd8"):
        # 0xFFD9 only occurs as the end-of-image marker (entropy data stuffs 0xFF with 0x00).
        return b"\xff\xd9" in data[-256:]
    if data.startswith(b"BM") and len(data) >= 6:
        return len(data) >= int.from_bytes(data[2:6], "little")
    return True  # TIFF and others: the stability checks have to do


@dataclass
class Item:
    """A frame between its read and its row: decoded pixels (or why not), then its verdict and the
    inspector that gave it."""

    cand: Candidate
    frame: np.ndarray | None = None
    error: str | None = None  # why it has no verdict: unreadable, or no detector could score it
    verdict: Verdict | None = None
    by: Inspector | None = None
    fallback_reason: str | None = None
    health: Any = None  # line.drift.Health, measured at decode when the bundle has a health profile
    product: str | None = None  # [watch.products]: the product the frame shows (line/products.py)
    held: str | None = None  # why it is not scored but held (an unknown product)
    bundle: Any = None  # line.products.Bundle: the detector pair that scores it
    shape: tuple[int, ...] | None = None  # the frame's own (H, W, C) where `frame` was decoded smaller
