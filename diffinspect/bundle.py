"""The model bundle: a folder of versions, each a manifest.json and files listed with their sha256.

    BUNDLE/ACTIVE          the active version's number, replaced atomically (`os.replace`)
    BUNDLE/versions/N/     a complete bundle: manifest.json (naming its parent version and what changed)
                           and files; files a change kept are hard links to the parent's where the
                           filesystem allows, copies otherwise

Every change (train, distil, tune, calibrate, export) builds a new version in a hidden folder under
versions/, renames it to the next number and only then moves the pointer, so a crash at any point
leaves the last active version loadable and a half-written version ignored. A bundle written before
versions existed (manifest.json and files at the top) loads as version 1; its first change moves that
content to versions/1 and writes versions/2.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from copy import deepcopy
from dataclasses import MISSING, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from diffinspect import DiffinspectError, __version__
from diffinspect.data.image import Preprocess, input_hw
from diffinspect.models.recipe import PATCH_FILE, Recipe
from diffinspect.models.schedule import NoiseSchedule
from diffinspect.vocab import (
    Choice,
    Color,
    ExportFormat,
    FrameDetector,
    Fusion,
    ModelKind,
    ModelSize,
    Precision,
    Sampler,
    ScheduleKind,
)

T = typing.TypeVar("T")
# 1: every bundle before the typed manifest (COPOD figures as repr text; a recipe without `fusion` sums
#    with COPOD). 2: COPOD figures as numbers. Older versions are read (`_upgrade`), newer ones refused.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ACTIVE = "ACTIVE"
VERSIONS = "versions"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """One verified version of a bundle. `path` is the bundle the user names, `folder` the version's files,
    `version` its number (1 for a bundle from before versions), `manifest` its typed manifest.json."""

    def __init__(self, path: Path, manifest: Manifest, folder: Path | None = None, version: int = 1):
        self.path = path
        self.manifest = manifest
        self.folder = folder or path
        self.version = version

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, version: int | None = None) -> Bundle:
        """The active version of the bundle at `path` (or `version`); a path to BUNDLE/versions/N is that version."""
        path = Path(path)
        if not path.is_dir():
            raise DiffinspectError(f"bundle not found: {path} (train one with `inspect train`)")
        if path.parent.name == VERSIONS and path.name.isdigit() and (path.parent.parent / ACTIVE).is_file():
            path, version = path.parent.parent, version or int(path.name)
        if (path / ACTIVE).is_file():
            number = version or active_version(path)
            folder = path / VERSIONS / str(number)
            if not (folder / MANIFEST).is_file():
                raise DiffinspectError(f"bundle {path} has no version {number} (versions: "
                                       f"{', '.join(map(str, version_numbers(path))) or 'none'})")
        else:
            if not (path / MANIFEST).exists():
                raise DiffinspectError(f"{path} is not a bundle: {MANIFEST} is missing")
            if version not in (None, 1):
                raise DiffinspectError(f"bundle {path} has only version 1 (it was written before versions)")
            number, folder = 1, path
        bundle = cls(path, Manifest.from_dict(read_manifest(folder / MANIFEST), folder), folder, number)
        if verify:
            for name in bundle.manifest.files:
                bundle.verify_file(name)
        return bundle

    def has(self, name: str) -> bool:
        return name in self.manifest.files

    @property
    def model(self) -> Model:
        """The diffusion model's section; a COPOD-only bundle has none (one error saying so)."""
        if self.manifest.model is None:
            raise DiffinspectError(f"bundle {self.path} holds no diffusion model (a COPOD-only bundle): "
                                   "train one with `inspect train`")
        return self.manifest.model

    @property
    def recipe(self) -> Recipe:
        self.model  # noqa: B018 (refuses a COPOD-only bundle)
        assert self.manifest.score is not None  # Manifest._check: a model comes with its recipe
        return self.manifest.score

    @property
    def schedule(self) -> NoiseSchedule:
        self.model  # noqa: B018
        assert self.manifest.schedule is not None
        return NoiseSchedule(self.manifest.schedule.kind, self.manifest.schedule.timesteps)

    def added_paths(self, role: str) -> list[Path]:
        """The added good images of one role ("calibration" or "training"), as paths inside the bundle."""
        return [self.folder / name for name in getattr(self.manifest.added or Added(), role)]

    def verify_file(self, name: str) -> Path:
        expected = self.manifest.files.get(name)
        if expected is None:
            raise DiffinspectError(f"bundle {self.path} has no {name}")
        fpath = confined(self.folder, name)
        if not fpath.is_file():
            raise DiffinspectError(f"bundle {self.path} is missing {name}")
        if sha256_file(fpath) != expected:
            raise DiffinspectError(f"bundle file {name} in {self.path} was altered (sha256 mismatch)")
        return fpath

    def file(self, name: str) -> Path:
        """Path of a listed file, verified again (it may have changed since loading)."""
        return self.verify_file(name)

    def arrays(self, name: str, shapes: dict[str, tuple[int, ...] | None]) -> dict[str, Any]:
        """The arrays of a listed .npz, each key of `shapes` present with that shape (None: any shape).

        Never unpickles; a file that is not an .npz, or holds other arrays, is one error naming it (a
        matching sha256 only proves the file is the one the manifest names, not that it is sound)."""
        import zipfile

        import numpy as np

        path = self.file(name)
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DiffinspectError(f"bundle file {name} in {self.path} is unreadable: {exc}") from None
        for key, shape in shapes.items():
            if key not in out:
                raise DiffinspectError(f"bundle file {name} in {self.path} has no array {key!r}")
            if shape is not None and out[key].shape != shape:
                raise DiffinspectError(f"bundle file {name} in {self.path}: {key} has shape {out[key].shape}, "
                                       f"the model needs {shape}")
        return out

    @contextmanager
    def updating(self, command: str = "update", summary: str | None = None) -> Iterator[BundleUpdate]:
        """A new version: this one's files and manifest to add to, replace or remove; on success it gets the
        next number and becomes active (and this object is that version). On an error nothing changes.
        summary: what changed, in a few words (default: the manifest keys that changed)."""
        update = BundleUpdate(self, command, summary)
        try:
            yield update
            update.commit()
        finally:
            shutil.rmtree(update.folder, ignore_errors=True)  # gone already when committed


class BundleUpdate:
    def __init__(self, bundle: Bundle, command: str, summary: str | None):
        _to_versions(bundle)
        self.bundle, self.command, self.summary = bundle, command, summary
        self.manifest = deepcopy(bundle.manifest)
        self.folder = _new_version_folder(bundle.path)
        try:
            for name in bundle.manifest.files:
                _link(confined(bundle.folder, name), confined(self.folder, name))
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def staging_path(self, name: str) -> Path:
        """A temporary path next to `name`; pass it to add_file once written."""
        target = confined(self.folder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        return Path(tmp)

    def add_file(self, name: str, staged: Path) -> None:
        digest = sha256_file(staged)
        target = confined(self.folder, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # replaces the link to the parent's file, never the file itself
        self.manifest.files[name] = digest

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.staging_path(name)
        tmp.write_bytes(data)
        self.add_file(name, tmp)

    def add_images(self, paths: list[Path], role: str, what: str, source: str) -> int:
        """Copy good images into ADDED_DIR under their content's sha256 (never the original file, which a
        camera or a disposal may change) as images of `role`; returns how many were new to the bundle."""
        added = self.manifest.added = self.manifest.added or Added()
        listed = set(added.calibration) | set(added.training)
        names = []
        for path in paths:
            staged = self.staging_path(f"{ADDED_DIR}/{path.name}")
            shutil.copyfile(path, staged)
            name = f"{ADDED_DIR}/{sha256_file(staged)}{path.suffix.lower()}"
            if name in listed or name in names:
                staged.unlink()
                continue
            self.add_file(name, staged)
            names.append(name)
        getattr(added, role).extend(names)
        added.history.append({
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "what": what, "role": role,
            "source": source, "images": len(names), "already_in_bundle": len(paths) - len(names)})
        return len(names)

    def remove_file(self, name: str) -> None:
        if self.manifest.files.pop(name, None) is not None:
            confined(self.folder, name).unlink(missing_ok=True)  # this version's link only

    def commit(self) -> None:
        b = self.bundle
        summary = self.summary or describe_change(b.manifest, self.manifest)
        self.manifest.version = Version(0, b.version, self.command, _now(), summary)
        number = _publish(b.path, self.folder, self.manifest)
        b.manifest, b.folder, b.version = self.manifest, b.path / VERSIONS / str(number), number


# -- versions --------------------------------------------------------------------------------------


def active_version(root: Path) -> int:
    """The number ACTIVE names (a versioned bundle) or 1 (a bundle from before versions)."""
    pointer = Path(root) / ACTIVE
    if not pointer.is_file():
        return 1
    text = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit() or int(text) < 1:
        raise DiffinspectError(f"bundle {root}: {ACTIVE} holds {text[:20]!r}, not a version number")
    return int(text)


def version_numbers(root: Path) -> list[int]:
    """The complete versions of a bundle, oldest first (a hidden folder being written is none)."""
    folder = Path(root) / VERSIONS
    if not (Path(root) / ACTIVE).is_file():
        return [1] if (Path(root) / MANIFEST).is_file() else []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / MANIFEST).is_file()) if folder.is_dir() else []


def activate(root: str | Path, number: int) -> Bundle:
    """Make version `number` the active one (it must load and verify first); returns it."""
    bundle = Bundle.load(root, version=number)
    if bundle.folder != bundle.path:  # a bundle from before versions has only its one version
        _point(bundle.path, number)
    return bundle


def version_rows(root: str | Path) -> list[dict[str, Any]]:
    """One row per version, oldest first: number, parent, created, command, summary, threshold, active."""
    root = Path(root)
    if not is_bundle(root):
        raise DiffinspectError(f"no bundle at {root}")
    active = active_version(root)
    rows = []
    for n in version_numbers(root):
        m = Bundle.load(root, verify=False, version=n).manifest
        v = m.version or Version(1, None, "(written before versions)", m.created)
        threshold = m.calibration.threshold if m.calibration else m.fallback.threshold if m.fallback else None
        rows.append({"version": n, "parent": v.parent, "created": v.created, "command": v.command,
                     "summary": v.summary, "threshold": threshold, "active": n == active})
    return rows


def diff_versions(root: str | Path, a: int, b: int) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every manifest key whose value differs (dotted keys; files by name)."""
    x, y = ({k: v for k, v in _flatten(plain(Bundle.load(root, verify=False, version=n).manifest)).items()
             if not k.startswith("version.")} for n in (a, b))
    return [(k, x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]


def prune(root: str | Path, keep: int) -> list[int]:
    """Remove all but the newest `keep` versions, never the active one; returns the numbers removed."""
    root = Path(root)
    if keep < 1:
        raise DiffinspectError("--keep must be at least 1")
    if not (root / ACTIVE).is_file():
        return []
    current = active_version(root)
    numbers = version_numbers(root)
    gone = [n for n in numbers[:-keep] if n != current]
    for n in gone:
        folder = root / VERSIONS / str(n)
        # Renamed to a hidden name first: a crash mid-removal leaves no half version behind a number.
        hidden = root / VERSIONS / f".removing-{n}"
        os.replace(folder, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return gone


def describe_change(before: Manifest, after: Manifest) -> str:
    """What a change did, in a few words: the top-level manifest sections and files that differ."""
    old, new = plain(before), plain(after)
    files = sorted(f for f in set(old["files"]) | set(new["files"]) if old["files"].get(f) != new["files"].get(f))
    keys = [k for k in new if k not in ("files", "version", "created") and old.get(k) != new.get(k)]
    parts = ([f"threshold {_figure(before.calibration)} -> {_figure(after.calibration)}"]
             if old.get("calibration") != new.get("calibration") else [])
    parts += [", ".join(k for k in keys if k != "calibration")] if set(keys) - {"calibration"} else []
    parts += [f"files {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}"] if files else []
    return "; ".join(parts) or "no change"


class ActivePointer:
    """The active version of a bundle, read again only when the pointer file changed (each switch is a new
    file, so a new inode) and no more often than every `every` seconds: cheap enough to ask between every
    two batches of `inspect watch`."""

    def __init__(self, root: Path, every: float = 1.0):
        self.root, self.every = Path(root), every
        self._stamp: tuple[int, int] | None = None
        self._number: int | None = None
        self._next = 0.0

    def active(self) -> int | None:
        """The version ACTIVE names (None: no pointer, or one that cannot be read just now)."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            try:
                st = (self.root / ACTIVE).stat()
                if (st.st_ino, st.st_mtime_ns) != self._stamp:
                    self._number, self._stamp = active_version(self.root), (st.st_ino, st.st_mtime_ns)
            except (OSError, DiffinspectError):
                self._number, self._stamp = None, None
        return self._number


def _figure(cal: Calibration | None) -> str:
    return "none" if cal is None else f"{cal.threshold:.4g}"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _point(root: Path, number: int) -> None:
    """Switch ACTIVE atomically: written under a temporary name, flushed, renamed over the old one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{ACTIVE}.", suffix=".tmp", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(f"{number}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / ACTIVE)


def _new_version_folder(root: Path) -> Path:
    """A hidden folder under versions/ to build a version in (ignored by every reader until renamed)."""
    (root / VERSIONS).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".new-", dir=root / VERSIONS))


def _link(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a file the new version keeps unchanged), or a copy where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(root: Path, folder: Path, manifest: Manifest) -> int:
    """Give a finished version folder the next number, then make it active; returns the number."""
    while True:
        number = max(version_numbers(root), default=0) + 1
        manifest.version.number = number
        write_manifest(folder, manifest)
        try:
            os.rename(folder, root / VERSIONS / str(number))
        except OSError:  # another writer took the number meanwhile
            if (root / VERSIONS / str(number)).exists():
                continue
            raise
        _point(root, number)
        return number


def _to_versions(bundle: Bundle) -> None:
    """A bundle from before versions becomes versions/1 (the same files, linked) before its first change.
    Until ACTIVE exists the flat layout is the bundle, so a crash midway leaves it loadable as it was."""
    root = bundle.path
    if bundle.folder != root:
        return
    first = root / VERSIONS / "1"
    names = list(bundle.manifest.files)
    if not (first / MANIFEST).is_file():
        tmp = _new_version_folder(root)
        for name in [*names, MANIFEST]:
            _link(confined(root, name), tmp / name)
        os.rename(tmp, first)
    _point(root, 1)
    for name in [*names, MANIFEST]:  # each lives on in versions/1
        confined(root, name).unlink(missing_ok=True)
    for name in names:  # and the sub-folders they leave empty (openvino/)
        for parent in Path(name).parents[:-1]:
            with suppress(OSError):
                (root / parent).rmdir()
    bundle.folder = first


def write_manifest(folder: Path, manifest: Manifest | dict[str, Any]) -> None:
    """Write a manifest (a raw dict only in tests, which make hostile ones)."""
    raw = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(raw, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)


TRAIN_HINT = "pass --overwrite to replace it, --resume to continue its training, or choose another --out"


def check_output(path: str | Path, overwrite: bool = False, resume: bool = False,
                 hint: str = "choose another --out") -> None:
    """Refuse an --out that holds anything but a bundle this command may replace.

    An empty or missing folder is fine; a bundle is replaced only with `overwrite` (or continued with
    `resume`); a folder of anything else is never replaced, so --overwrite cannot delete user files.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffinspectError(f"output {path} exists and is not a folder")
    _check_writable(path.parent)
    if not path.exists() or not any(path.iterdir()) or resume:
        return
    if not is_bundle(path):
        raise DiffinspectError(f"output folder {path} is not empty and holds no diffinspect bundle "
                               "(--overwrite only replaces a bundle): choose another --out")
    if not overwrite:
        raise DiffinspectError(f"output folder {path} already holds a bundle: {hint}")


def _check_writable(folder: Path) -> None:
    """Fail now, in one line, where the bundle could not be written at the end (after minutes of work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".diffinspect-probe.", dir=folder)).rmdir()
    except OSError as exc:
        raise DiffinspectError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def is_bundle(path: str | Path) -> bool:
    """A folder holding versions (ACTIVE) or a manifest.json that is a diffinspect bundle manifest (a
    dataset's manifest.json is not)."""
    if (Path(path) / ACTIVE).is_file():
        return True
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("schema_version"), int)
            and "diffinspect_version" in manifest and isinstance(manifest.get("files"), dict))


@contextmanager
def creating(path: str | Path, overwrite: bool = False, command: str = "train",
             summary: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder to fill with a whole bundle (files plus a manifest, see `finish`).

    A new `path` gets it as versions/1; an existing bundle (only with `overwrite`, see `check_output`)
    gets it as its next version, the one that was active named as its parent, so nothing is lost.
    """
    path = Path(path).resolve()
    check_output(path, overwrite)
    if is_bundle(path):
        parent = Bundle.load(path, verify=False)
        _to_versions(parent)
        tmp = _new_version_folder(path)
        try:
            yield tmp
            manifest = _written(tmp)
            manifest.version = Version(0, parent.version, command, _now(), summary or describe_change(
                parent.manifest, manifest))
            _publish(path, tmp, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        tmp = whole / VERSIONS / "1"
        tmp.mkdir(parents=True)
        yield tmp
        manifest = _written(tmp)
        manifest.version = Version(1, None, command, _now(), summary or "first version")
        write_manifest(tmp, manifest)
        _point(whole, 1)
        os.replace(whole, path)  # `path` is missing or an empty folder (check_output)
    finally:
        shutil.rmtree(whole, ignore_errors=True)


def _written(folder: Path) -> Manifest:
    if not (folder / MANIFEST).exists():
        raise RuntimeError("bundle written without a manifest")
    return Manifest.from_dict(read_manifest(folder / MANIFEST), folder)


def finish(folder: Path, manifest: Manifest, names: list[str]) -> None:
    """List `names` (already in folder) with their sha256 and write the manifest."""
    for name in names:
        manifest.files[name] = sha256_file(folder / name)
    write_manifest(folder, manifest)


def read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        # NaN and Infinity tokens (not JSON, but Python's parser reads them) are refused by
        # Manifest.from_dict, which names the field that holds one.
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DiffinspectError(f"bundle manifest {mpath} is unreadable: {exc}") from None
    if not isinstance(manifest, dict):
        raise DiffinspectError(f"bundle manifest {mpath} is not a JSON object")
    return manifest


def confined(root: Path, name: Any) -> Path:
    """root/name for a file the manifest lists, refused unless it stays inside the bundle: relative,
    no `..`, and no symlink (of the file or a folder on the way) leading outside."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise DiffinspectError(f"bundle {root} lists a bad file name: {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DiffinspectError(f"bundle {root} lists {name!r}, a path outside the bundle")
    target = root / rel
    try:
        inside = target.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise DiffinspectError(f"bundle {root} lists {name!r}, which leads outside the bundle")
    return target



# -- the manifest, typed -------------------------------------------------------------------------------
# Every section is a dataclass; `_parse` checks a manifest.json against these types (and the bounds in
# field metadata), so a hand-edited or hostile manifest is refused in one line naming the key. Unknown
# keys are ignored: a later minor writer may add some.


def _bounded(default: Any, low: float | None = None, high: float | None = None, *, above: bool = False) -> Any:
    """A field whose number lies in [low, high] (or above low, exclusive, with above=True)."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


@dataclass
class Model:
    kind: ModelKind
    size: ModelSize
    image_size: int | tuple[int, int]  # one side, or (height, width)
    channels: int = _bounded(1, 1, 3)
    params: int | None = None
    gflops: float | None = None


@dataclass
class Schedule:
    kind: ScheduleKind = ScheduleKind.LINEAR
    timesteps: int = _bounded(1000, 2)


@dataclass
class Student:
    """A distilled student: its weights file and the sampler path it was trained for."""

    weights: str
    steps: int = _bounded(1, 1)
    teacher_steps: int | None = _bounded(None, 1)
    t_star: int | None = None
    iterations: int | None = None
    seconds: float | None = None
    method: str | None = None
    defect_share: float | None = None
    selection: dict[str, Any] = field(default_factory=dict)


@dataclass
class Samplers:
    default: Sampler = Sampler.TEACHER
    student: Student | None = None


@dataclass
class Training:
    """Where the model learnt from: the images (relative to `source`), the run's figures and config."""

    source: str | None = None
    data: str | None = None
    train_files: list[str] = field(default_factory=list)
    holdout_files: list[str] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)
    steps: int | None = None
    seconds: float | None = None
    steps_per_second: float | None = None
    final_loss: float | None = None
    device: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, Any] | None = None

    def paths_on_disk(self, held_out: bool = False) -> list[Path]:
        """The training (or held-out) images still on disk."""
        if not self.source:
            return []
        source = Path(self.source)
        return [p for p in (source / f for f in (self.holdout_files if held_out else self.train_files))
                if p.exists()]

    @property
    def batch_size(self) -> Any:
        return (self.config.get("train") or {}).get("batch_size", 16)


@dataclass
class FrameTermRecord:
    """The frame-level term's fitted figures (scoring/diffusion.FrameTerm); old bundles summed, with COPOD."""

    weight: float
    diffusion: tuple[float, float]  # (median, IQR) of reference diffusion scores
    copod: tuple[float, float]  # the same for the embedding scores
    rule: Fusion = Fusion.SUM
    detector: FrameDetector = FrameDetector.COPOD


@dataclass
class Calibration:
    threshold: float
    false_reject_rate: float = _bounded(MISSING, 0, 1, above=True)
    n: int = _bounded(MISSING, 1)
    pixel_threshold: float | None = None
    n_reference: int | None = None
    source: str | None = None
    folder: str | None = None  # the good-image folder; None: the training holdout
    backend: str | None = None
    sampler: Sampler | None = None
    score_stats: dict[str, float] = field(default_factory=dict)
    terms: list[str] = field(default_factory=list)
    rule: str | None = None  # the threshold rule that set it (scoring/threshold.RULES)
    confidence: float | None = None  # set: the calibration-conditional bound holds at this confidence
    frame_term: FrameTermRecord | None = None


@dataclass
class Fallback:
    """The COPOD fallback: its fit set (a listed .npy file) and calibrated threshold."""

    threshold: float
    file: str = "embeddings.npy"
    detector: str = "copod"
    false_reject_rate: float | None = _bounded(None, 0, above=True)
    n_calibration: int = _bounded(0, 0)
    n_fit: int | None = _bounded(None, 1)
    feature_size: int = _bounded(128, 8)
    feature_version: int = 1
    embedding_dim: int | None = _bounded(None, 1)


@dataclass
class Export:
    format: ExportFormat
    precision: Precision
    sampler: Sampler
    files: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    int8_scope: str | None = None
    quantized_nodes: int | None = None
    fake_quantize_nodes: int | None = None
    created: str | None = None
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class ScoreQuantile:
    level: float
    value: float
    n: int


@dataclass
class Health:
    """What calibration learnt about good frames (scoring/health.py); the arrays are in health.npz."""

    file: str
    n: int
    bands: dict[str, tuple[float, float]] = field(default_factory=dict)
    score_quantile: dict[str, ScoreQuantile] = field(default_factory=dict)
    # The min_side its frames were read at (data/image.py, Preprocess.read_side); None: whole frames, as
    # every profile before it was recorded. Watch decodes reduced only where this matches its own.
    read_side: int | None = _bounded(None, 1)


ADDED_DIR = "added"  # good images added after training: copies named by their content's sha256


@dataclass
class Added:
    """Good images added after training (`calibrate --add-reviewed`, `train --add-good`), each a copy in
    ADDED_DIR listed in `files`. Calibration images are scored for the threshold; once the model is
    fine-tuned on them they move to `training`, since a threshold's bound needs images nothing was fitted on."""

    calibration: list[str] = field(default_factory=list)
    training: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # what was added when, from where, how many


@dataclass
class Version:
    """Which version of its bundle a manifest is, its parent (the version it was made from; none for a
    first training) and what made it: the command, when (UTC) and a short summary."""

    number: int = _bounded(MISSING, 0)
    parent: int | None = None
    command: str = ""
    created: str | None = None
    summary: str = ""


@dataclass
class Manifest:
    """manifest.json: what a bundle holds. A COPOD-only (cold-start) bundle has no model."""

    preprocess: Preprocess
    files: dict[str, str] = field(default_factory=dict)  # every other file of the bundle -> sha256
    schema_version: int = SCHEMA_VERSION
    diffinspect_version: str = __version__
    created: str | None = None
    model: Model | None = None
    schedule: Schedule | None = None
    score: Recipe | None = None
    sampler: Samplers = field(default_factory=Samplers)
    training: Training | None = None
    calibration: Calibration | None = None
    fallback: Fallback | None = None
    health: Health | None = None
    exports: dict[str, Export] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None
    version: Version | None = None  # None: written before versions (loads as version 1)
    added: Added | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], root: Path) -> Manifest:
        """The manifest of the bundle at `root`, or one DiffinspectError naming the key that is wrong."""
        version = raw.get("schema_version")
        if type(version) is not int or version < 1:
            raise DiffinspectError(f"bundle {root} has schema version {version!r}, this diffinspect reads "
                                   f"versions 1 to {SCHEMA_VERSION}")
        if version > SCHEMA_VERSION:
            raise DiffinspectError(f"bundle {root} has schema version {version}, newer than this diffinspect "
                                   f"reads ({SCHEMA_VERSION}): upgrade diffinspect")
        manifest = _parse(cls, _upgrade(raw), "")
        manifest.schema_version = SCHEMA_VERSION
        manifest._check(root)
        if version == 1:  # exports that were current stay current
            for rec in manifest.exports.values():
                if rec.fingerprint == _v1_fingerprint(raw, rec.sampler):
                    rec.fingerprint = manifest.graph_fingerprint(rec.sampler)
        return manifest

    def graph_fingerprint(self, sampler: str) -> str:
        """What an exported graph was built from: model, recipe, schedule, sampler and weights (by sha256).
        The recipe (t*, term weights, blur, top-k) is baked into the graph, so re-tuning it, retraining or
        re-distilling makes older exports stale."""
        student = self.student if sampler == Sampler.STUDENT else None
        weights = ["weights.pt"] + ([student.weights] if student else [])
        score = plain(self.score)
        if self.score.patch_weight > 0:  # the patch term's statistics (and its backbone) are graph constants
            weights += [PATCH_FILE] + ([self.score.backbone.file] if self.score.backbone else [])
        else:  # without the term the graph is what it was before the field existed: exports stay current
            score.pop("patch_weight", None)
        if score.get("backbone") is None:  # likewise for bundles without a backbone
            score.pop("backbone", None)
        payload = {"model": plain(self.model), "score": score, "schedule": plain(self.schedule),
                   "sampler": str(sampler), "student": plain(student),
                   "weights": {f: self.files.get(f) for f in weights}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return plain(self)

    @property
    def student(self) -> Student | None:
        return self.sampler.student

    def _check(self, root: Path) -> None:
        """What the types cannot say: file names inside the bundle, digests, sizes and the ROI."""
        for name, digest in self.files.items():
            confined(root, name)
            if not _SHA256.fullmatch(digest):
                raise DiffinspectError(f"bundle {root}: files[{name!r}] is not a sha256 digest")
        prep = self.preprocess
        if prep.color not in (Color.GRAY, Color.RGB):
            _refuse("preprocess.color", "one of ('gray', 'rgb')", prep.color)
        for where, size in (("preprocess", prep.image_size), ("model", self.model and self.model.image_size)):
            if size is not None and not all(8 <= side <= 8192 for side in input_hw(size)):
                _refuse(f"{where}.image_size", "a side in [8, 8192] or [height, width]", size)
        if prep.roi is not None and min(prep.roi[2:]) <= 0:
            _refuse("preprocess.roi", "[x, y, width, height] whole numbers", list(prep.roi))
        if prep.tile_scale <= 0:
            _refuse("preprocess.tile_scale", "a positive finite number", prep.tile_scale)
        if self.model is not None and self.model.channels not in (1, 3):
            _refuse("model.channels", "one of (1, 3)", self.model.channels)
        if self.model is not None and (self.score is None or self.schedule is None):
            _refuse("score" if self.score is None else "schedule", "present beside model", None)
        backbone = self.score and self.score.backbone
        if backbone:
            if bad := backbone.invalid():
                _refuse(f"score.backbone.{bad[0]}", bad[1], bad[2])
            if backbone.kind is None or backbone.input_size is None:
                _refuse("score.backbone.kind" if backbone.kind is None else "score.backbone.input_size",
                        "present", None)
            if backbone.file not in self.files:
                raise DiffinspectError(f"bundle {root}: score.backbone.file {backbone.file!r} is not a listed file")
        if self.fallback is not None and self.fallback.file not in self.files:
            raise DiffinspectError(f"bundle {root}: fallback.file {self.fallback.file!r} is not a listed file")
        for name in (*self.added.calibration, *self.added.training) if self.added else ():
            if name not in self.files:
                raise DiffinspectError(f"bundle {root}: added image {name!r} is not a listed file")
        for name, rec in self.exports.items():
            confined(root, name)
            for f in rec.files:
                confined(root, f)


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in today's shape (the types then check it like any other)."""
    if raw["schema_version"] >= 2:
        return raw
    raw = deepcopy(raw)
    if isinstance(raw.get("score"), dict):
        raw["score"] = {**{k: v.value for k, v in Recipe.OLD_DEFAULTS.items()}, **raw["score"]}
    fallback = raw.get("fallback")
    if isinstance(fallback, dict):
        fallback.setdefault("file", fallback.get("embeddings_file"))
        for key in ("threshold", "false_reject_rate", "n_calibration", "n_fit", "feature_size", "feature_version",
                    "embedding_dim"):
            fallback[key] = _number_text(fallback.get(key))
    return raw


def _v1_fingerprint(raw: dict[str, Any], sampler: str) -> str:
    """graph_fingerprint as version 1 computed it, from the manifest's JSON."""
    info = raw.get("sampler") or {}
    student = info.get("student") if isinstance(info, dict) else None
    weights = ["weights.pt"] + ([student["weights"]] if sampler == "student" and student else [])
    payload = {"model": {k: (raw.get("model") or {}).get(k) for k in ("kind", "size", "image_size", "channels")},
               "score": raw.get("score"), "schedule": raw.get("schedule"), "sampler": sampler,
               "student": student, "weights": {f: raw.get("files", {}).get(f) for f in weights}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _number_text(value: Any) -> Any:
    """A version-1 COPOD figure (repr text, "" for none) as the number it spells; anything else unchanged."""
    if value == "":
        return None
    if not isinstance(value, str):
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _refuse(where: str, kind: str, value: Any) -> None:
    raise DiffinspectError(f"bundle manifest field {where} must be {kind}, got {value!r}")


def _parse(hint: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as an instance of the type `hint`, or one error naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        chosen = next((a for a in options if typing.get_origin(a) in (list, tuple)), None)
        hint = chosen if chosen is not None and isinstance(value, list) else options[0]
        return _parse(hint, value, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _refuse(where or "manifest", "an object", value)
        hints, out = typing.get_type_hints(hint), {}
        for f in dataclasses.fields(hint):
            key = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                out[f.name] = _check_bounds(f, _parse(hints[f.name], value[f.name], key), key)
            elif f.default is MISSING and f.default_factory is MISSING:
                _refuse(key, "present", None)
        return hint(**out)
    if origin in (list, tuple):
        if not isinstance(value, list) or origin is tuple and len(value) != len(args):
            _refuse(where, f"a list of {len(args)}" if origin is tuple else "a list", value)
        items = args if origin is tuple else args * len(value)
        parsed = [_parse(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(items, value, strict=True))]
        return tuple(parsed) if origin is tuple else parsed
    if origin is dict:
        if not isinstance(value, dict):
            _refuse(where, "an object", value)
        return {k: _parse(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Choice):
        if not isinstance(value, str) or value not in hint.values():
            _refuse(where, f"one of {hint.values()}", value)
        return hint(value)
    if hint is bool:
        if not isinstance(value, bool):
            _refuse(where, "true or false", value)
        return value
    if hint is int:
        if type(value) is not int:
            _refuse(where, "a whole number", value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            _refuse(where, "a finite number", value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _refuse(where, "text", value)
        return value
    raise TypeError(f"no manifest parser for {hint!r}")  # a type added above without a rule here


def _check_bounds(f: dataclasses.Field, value: Any, where: str) -> Any:
    low, high, above = f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("above")
    if value is None or (low is None and high is None):
        return value
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        kind = "a positive number" if above and low == 0 else \
            f"a number >= {low}" + (f" and <= {high}" if high is not None else "")
        _refuse(where, kind, value)
    return value


def section(cls: type[T], raw: Any, where: str = "") -> T:
    """A manifest section from its JSON form, checked as Bundle.load checks it."""
    return _parse(cls, raw, where)


def plain(value: Any) -> Any:
    """The JSON form of a manifest value: dataclasses as objects, enums as their text, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
