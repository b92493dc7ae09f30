"""Which files in the watched folders are frames: listing the folders, filtering names, and the
(size, mtime_ns) the intake's completeness checks compare."""

from __future__ import annotations

import fnmatch
import logging
import os
from pathlib import Path

from diffinspect.data.image import is_image_path
from diffinspect.line.disposal import OUTPUT_SUBDIRS

log = logging.getLogger(__name__)


class Folders:
    """The watched folders, seen through the name filter (pattern, recursion, hidden files, OUT)."""

    def __init__(self, roots: list[Path], out: Path, pattern: str | None, recursive: bool) -> None:
        self.roots, self.pattern, self.recursive = roots, pattern, recursive
        self._scan_warned: set[str] = set()
        self._excluded = [os.path.join(str(out), d) for d in OUTPUT_SUBDIRS]

    @staticmethod
    def stat(path: str) -> tuple[int, int] | None:
        """(size, mtime_ns), None when the file is gone."""
        try:
            st = os.stat(path)
        except OSError:
            try:  # a dangling symlink or a symlink loop is still a frame: it gets an error row
                st = os.lstat(path)
            except OSError:
                return None  # gone, or an unreadable directory entry: the next rescan tries again
        return st.st_size, st.st_mtime_ns

    def wanted(self, path: str, root: Path) -> bool:
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if parts[0] == ".." or (len(parts) > 1 and not self.recursive):
            return False
        if any(p.startswith(".") for p in parts):
            return False  # hidden files: the usual temporary name of a frame being written
        if any(path.startswith(ex + os.sep) for ex in self._excluded):
            return False  # our own overlays and moved frames when OUT lies inside a folder
        name = parts[-1]
        if self.pattern:
            return fnmatch.fnmatchcase(name.lower(), self.pattern.lower())
        return is_image_path(Path(name))

    def root_of(self, path: str) -> Path | None:
        for root in sorted(self.roots, key=lambda p: -len(str(p))):
            if path.startswith(str(root) + os.sep) and self.wanted(path, root):
                return root
        return None

    def files_in(self, root: Path) -> list[str]:
        """The frames directly in root (or under it, recursive), by the name filter."""
        found: list[str] = []
        try:
            if self.recursive:
                for dirpath, dirnames, filenames in os.walk(root, onerror=self._scan_error):
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    found.extend(os.path.join(dirpath, n) for n in filenames)
            else:
                with os.scandir(root) as it:
                    found.extend(e.path for e in it if not e.is_dir(follow_symlinks=False))
            self._scan_warned.discard(str(root))
        except OSError as exc:
            self._scan_error(exc)
        return [p for p in found if self.wanted(p, root)]

    def _scan_error(self, exc: OSError) -> None:
        where = str(exc.filename)
        if where not in self._scan_warned:  # a dropped network share: say it once, keep trying
            self._scan_warned.add(where)
            log.warning(f"cannot list {where}: {exc.strerror or exc}; retrying")
