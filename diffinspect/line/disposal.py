"""What happens to a frame file after its row is committed: keep, move (to OUT/ok|ng|error|hold) or delete.

The one place that moves or deletes a watched file. It runs only for frames whose row is committed:
right after the commit (the lane), or on start-up for frames an earlier run committed but did not get
to move (the intake). Nothing else is ever deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# OUT's own folders: overlays, and the moved frames by status; the intake never takes frames from them.
OUTPUT_SUBDIRS = ("overlays", "ok", "ng", "error", "hold")

_move_lock = threading.Lock()  # lanes move concurrently; free-name search + rename must be atomic


def dispose(path: Path, size: int, mtime_ns: int, status: str, after: str, out: Path) -> str | None:
    """Move or delete a frame whose row is committed; returns the new path (move) or None.

    Leaves the file alone when it is no longer the frame of that row (same name, new content)."""
    if after == "keep":
        return str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
        raise OSError(f"{path} changed after scoring; left in place as a new frame")
    if after == "delete":
        os.unlink(path)
        return None
    return _move(path, out / status)


def _move(path: Path, dest_dir: Path) -> str:
    dest_dir.mkdir(parents=True, exist_ok=True)
    with _move_lock:
        dest = dest_dir / path.name
        n = 1
        while os.path.lexists(dest):  # never overwrite an earlier frame of the same name
            dest = dest_dir / f"{path.stem}-{n}{path.suffix}"
            n += 1
        try:
            os.rename(path, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # OUT on another filesystem: copy, then delete
                raise
            shutil.move(str(path), str(dest))
    return str(dest)


class Disposal:
    """The `after` policy of one watch run, shared by the lanes and the intake. `room()` says whether OUT
    has space for a moved frame (below the free-space floor frames stay where they are); `moved(path)`
    hears of each frame moved into OUT (retention keeps them within the disk budget)."""

    def __init__(self, after: str, out: Path, room: Callable[[], bool] = lambda: True,
                 moved: Callable[[str], None] = lambda p: None) -> None:
        self.after, self.out = after, out
        self.room, self.moved = room, moved

    def __call__(self, path: Path, size: int, mtime_ns: int, status: str, what: str = "") -> bool:
        """Apply the policy to a committed frame; True when the file is still in its folder."""
        if self.after == "keep" or (self.after == "move" and not self.room()):
            return True
        try:
            dest = dispose(path, size, mtime_ns, status, self.after, self.out)
        except Exception as exc:  # left in place; its row is committed, so it is never re-scored
            log.warning(f"could not {self.after} {what}{path}: {exc}")
            return True
        if self.after == "move" and dest is not None:
            self.moved(dest)
        return False
