"""The model bundle: a directory with manifest.json and files, each listed with its sha256.

A bundle is written whole into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written bundle. Later stages (calibrate, distil, export) add files one by one: each new
file is written under a temporary name and renamed, then the manifest is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffinspect import DiffinspectError, __version__

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Bundle:
    """A verified bundle on disk. `manifest` is the parsed manifest.json."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise DiffinspectError(f"bundle not found: {path} (train one with `inspect train`)")
        mpath = path / MANIFEST
        if not mpath.exists():
            raise DiffinspectError(f"{path} is not a bundle: {MANIFEST} is missing")
        manifest = read_manifest(mpath)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DiffinspectError(
                f"bundle {path} has schema version {manifest.get('schema_version')!r}, "
                f"this diffinspect reads version {SCHEMA_VERSION}")
        validate_manifest(path, manifest)
        bundle = cls(path, manifest)
        if verify:
            for name in manifest.get("files", {}):
                bundle.verify_file(name)
        return bundle

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def verify_file(self, name: str) -> Path:
        expected = self.manifest.get("files", {}).get(name)
        if expected is None:
            raise DiffinspectError(f"bundle {self.path} has no {name}")
        fpath = confined(self.path, name)
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
    def updating(self) -> Iterator[BundleUpdate]:
        """Add or replace files and manifest fields; the manifest is rewritten once, at the end."""
        update = BundleUpdate(self)
        yield update
        update.commit()


class BundleUpdate:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.manifest = json.loads(json.dumps(bundle.manifest))

    def staging_path(self, name: str) -> Path:
        """A temporary path next to `name`; pass it to add_file once written."""
        target = self.bundle.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        return Path(tmp)

    def add_file(self, name: str, staged: Path) -> None:
        digest = sha256_file(staged)
        os.replace(staged, self.bundle.path / name)
        self.manifest.setdefault("files", {})[name] = digest

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.staging_path(name)
        tmp.write_bytes(data)
        self.add_file(name, tmp)

    def remove_file(self, name: str) -> None:
        if self.manifest.get("files", {}).pop(name, None) is not None:
            confined(self.bundle.path, name).unlink(missing_ok=True)  # never a file outside the bundle

    def commit(self) -> None:
        write_manifest(self.bundle.path, self.manifest)
        self.bundle.manifest = self.manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
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
    """A folder whose manifest.json is a diffinspect bundle manifest (a dataset's manifest.json is not)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and isinstance(manifest.get("schema_version"), int)
            and "diffinspect_version" in manifest and isinstance(manifest.get("files"), dict))


@contextmanager
def creating(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (with manifest written by caller).

    The caller writes its files plus a manifest (see `new_manifest` and `finish`). An existing `path`
    is replaced only when it is a bundle and `overwrite` is set (see `check_output`).
    """
    path = Path(path).resolve()
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).exists():
            raise RuntimeError("bundle written without a manifest")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_manifest(**fields: Any) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "diffinspect_version": __version__, **fields, "files": {}}


def finish(folder: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """List `names` (already in folder) with their sha256 and write the manifest."""
    for name in names:
        manifest["files"][name] = sha256_file(folder / name)
    write_manifest(folder, manifest)


def read_manifest(mpath: Path) -> dict[str, Any]:
    try:
        # NaN and Infinity tokens (not JSON, but Python's parser reads them) are refused by
        # validate_manifest, which names the field that holds one.
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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_manifest(root: Path, m: dict[str, Any]) -> None:
    """Types and ranges of every manifest field the runtime reads; one line naming the field otherwise.

    A bundle is input like any other: a NaN threshold would label every part OK (score > NaN is
    false), a path would make the runtime read or delete files outside the bundle.
    """
    files = _table(m, "files", required=True)
    for name, digest in files.items():
        confined(root, name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise DiffinspectError(f"bundle {root}: files[{name!r}] is not a sha256 digest")
    prep = _table(m, "preprocess")
    if prep is not None:
        _choice(prep, "color", ("gray", "rgb"), "preprocess")
        _input_size(prep, "preprocess")
        _choice(prep, "resize", ("stretch", "crop", "pad"), "preprocess", optional=True)
        _choice(prep, "feed", ("frame", "tiles"), "preprocess", optional=True)
        _number(prep, "tile_scale", "preprocess", optional=True, positive=True)
        roi = prep.get("roi")
        if roi is not None and not (isinstance(roi, list) and len(roi) == 4
                                    and all(type(v) is int for v in roi) and min(roi[2:]) > 0):
            raise DiffinspectError(f"bundle {root}: preprocess.roi must be [x, y, width, height] whole numbers")
    model = _table(m, "model")
    if model is not None:
        _input_size(model, "model")
        _choice(model, "channels", (1, 3), "model")
    cal = _table(m, "calibration")
    if cal is not None:
        _number(cal, "threshold", "calibration")
        _number(cal, "pixel_threshold", "calibration", optional=True)
        _integer(cal, "n", "calibration", 1, None, optional=True)
        _number(cal, "false_reject_rate", "calibration", optional=True, positive=True)
        term = cal.get("frame_term")
        if term is not None:
            if not isinstance(term, dict):
                raise DiffinspectError(f"bundle {root}: calibration.frame_term must be an object")
            _number(term, "weight", "calibration.frame_term")
            _choice(term, "rule", ("sum", "max", "minp"), "calibration.frame_term", optional=True)
            _choice(term, "detector", ("gaussian", "copod"), "calibration.frame_term", optional=True)
            for key in ("diffusion", "copod"):
                pair = term.get(key)
                if not (isinstance(pair, list) and len(pair) == 2 and all(_finite(v) for v in pair)):
                    raise DiffinspectError(f"bundle {root}: calibration.frame_term.{key} must be two finite numbers")
    fallback = _table(m, "fallback")
    if fallback is not None:
        _number(fallback, "threshold", "fallback", as_text=True)
        if fallback.get("file") not in files:
            raise DiffinspectError(f"bundle {root}: fallback.file {fallback.get('file')!r} is not a listed file")
    exports = _table(m, "exports")
    for name, rec in (exports or {}).items():
        confined(root, name)
        if not isinstance(rec, dict):
            raise DiffinspectError(f"bundle {root}: exports[{name!r}] must be an object")
        for f in rec.get("files") or []:
            confined(root, f)


def _table(m: dict[str, Any], key: str, required: bool = False) -> dict[str, Any] | None:
    value = m.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise DiffinspectError(f"bundle manifest field {key} must be an object, got {value!r}")
    return value


def _finite(value: Any, as_text: bool = False) -> bool:
    if as_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(d: dict[str, Any], key: str, where: str, optional: bool = False, positive: bool = False,
            as_text: bool = False) -> None:
    value = d.get(key)
    if value is None and optional:
        return
    if not _finite(value, as_text) or (positive and float(value) <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise DiffinspectError(f"bundle manifest field {where}.{key} must be {kind}, got {value!r}")


def _input_size(d: dict[str, Any], where: str) -> None:
    """image_size: one side, or [height, width] for a rectangular input; each side in [8, 8192]."""
    value = d.get("image_size")
    if isinstance(value, list) and len(value) == 2:
        for i, side in enumerate(value):
            _integer({f"image_size[{i}]": side}, f"image_size[{i}]", where, 8, 8192)
        return
    _integer(d, "image_size", where, 8, 8192)


def _integer(d: dict[str, Any], key: str, where: str, low: int, high: int | None, optional: bool = False) -> None:
    value = d.get(key)
    if value is None and optional:
        return
    if type(value) is not int or value < low or (high is not None and value > high):
        raise DiffinspectError(f"bundle manifest field {where}.{key} must be a whole number >= {low}"
                               + (f" and <= {high}" if high else "") + f", got {value!r}")


def _choice(d: dict[str, Any], key: str, choices: tuple, where: str, optional: bool = False) -> None:
    value = d.get(key)
    if value is None and optional:
        return
    if value not in choices or isinstance(value, bool):
        raise DiffinspectError(f"bundle manifest field {where}.{key} must be one of {choices}, got {value!r}")
