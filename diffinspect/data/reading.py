"""Reading a list of image files, with one policy for a bad file everywhere: skip it, name it, count it.

Training, tuning, calibration, cold start, export and the evaluation baselines all read their good
images through `read_images`. (A frame on the line is different: it gets its own error record.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffinspect.data.image import ImageError, read_image
from diffinspect.logs import Progress

SHOWN = 3  # bad files named in the warning; the rest are counted
log = logging.getLogger(__name__)


@dataclass
class ReadImages:
    frames: list[np.ndarray]
    paths: list[Path]  # the files behind `frames`, in order
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)


def read_images(paths: list[Path], color: str, what: str = "images", *,
                transform: Callable[[np.ndarray], np.ndarray] | None = None,
                progress: Progress | None = None) -> ReadImages:
    """Decode every file (then `transform` it, e.g. fit it to the model); a file that cannot be read,
    decoded or transformed is skipped, and one warning names the first few and counts them all."""
    out = ReadImages([], [])
    for i, p in enumerate(paths):
        try:
            img = read_image(p, color)
            out.frames.append(transform(img) if transform else img)
            out.paths.append(p)
        except ImageError as exc:
            out.skipped.append((p, str(exc)))
        if progress:
            progress(f"reading {what}", i + 1, len(paths))
    if out.skipped:
        log.warning(skipped_message(out.skipped, what))
    return out


def skipped_message(skipped: list[tuple[Path, str]], what: str) -> str:
    named = ", ".join(f"{p.name} ({why})" for p, why in skipped[:SHOWN])
    more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    return f"skipped {len(skipped)} undecodable {what}: {named}{more}"
