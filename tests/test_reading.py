"""The one reader of image lists: a bad file is skipped, named and counted, never fatal."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from diffinspect.data.reading import read_images


def test_bad_files_are_skipped_named_and_counted(tmp_path: Path, caplog) -> None:
    good = []
    for i in range(3):
        p = tmp_path / f"good{i}.png"
        cv2.imwrite(str(p), np.full((8, 8), 40 * i, np.uint8))
        good.append(p)
    bad = [tmp_path / f"bad{i}.png" for i in range(5)]
    for p in bad:
        p.write_bytes(b"not an image")
    bad.append(tmp_path / "missing.png")
    paths = [good[0], *bad, good[1], good[2]]
    with caplog.at_level("WARNING", logger="diffinspect"):
        out = read_images(paths, "gray", "good images", transform=lambda f: f[:4, :4])
    assert re.search(r"skipped 6 undecodable good images: bad0\.png \(.*\) and 3 more", caplog.text)
    assert out.paths == good
    assert [f.shape for f in out.frames] == [(4, 4, 1)] * 3
    assert [p for p, _ in out.skipped] == bad and all(why for _, why in out.skipped)
