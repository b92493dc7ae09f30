"""The model bundle: a directory with manifest.json and files, each listed with its sha256.

A bundle is written whole into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written bundle. Later stages (calibrate, distil, export) add files one by one: each new
file is written under a temporary name and renamed, then the manifest is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DiffinspectError(f"bundle manifest {mpath} is unreadable: {exc}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DiffinspectError(
                f"bundle {path} has schema version {manifest.get('schema_version')}, "
                f"this diffinspect reads version {SCHEMA_VERSION}")
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
        fpath = self.path / name
        if not fpath.is_file():
            raise DiffinspectError(f"bundle {self.path} is missing {name}")
        if sha256_file(fpath) != expected:
            raise DiffinspectError(f"bundle file {name} in {self.path} was altered (sha256 mismatch)")
        return fpath

    def file(self, name: str) -> Path:
        """Path of a listed file, verified again (it may have changed since loading)."""
        return self.verify_file(name)

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
            (self.bundle.path / name).unlink(missing_ok=True)

    def commit(self) -> None:
        write_manifest(self.bundle.path, self.manifest)
        self.bundle.manifest = self.manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)


@contextmanager
def creating(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (with manifest written by caller).

    The caller writes its files plus a manifest (see `new_manifest` and `finish`).
    """
    path = Path(path).resolve()
    if path.exists() and not overwrite and any(path.iterdir()):
        raise DiffinspectError(f"output folder {path} exists and is not empty (choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).exists():
            raise RuntimeError("bundle written without a manifest")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
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
