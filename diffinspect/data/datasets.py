"""Where images come from: an MVTec-AD category or a plain folder of normal images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffinspect import DiffinspectError
from diffinspect.data.image import is_image_path


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under folder, sorted by path (hidden files and folders skipped). Every entry named like
    an image that is not a folder is listed, a dangling symlink, a symlink loop or a FIFO too: reading it
    fails with a reason, so the file is named (an error record, or a skipped file) instead of vanishing."""
    folder = Path(folder)
    if not folder.exists():
        raise DiffinspectError(f"folder not found: {folder}")
    if not folder.is_dir():
        return [folder] if is_image_path(folder) else []
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern)
        if is_image_path(p) and not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def is_mvtec_category(path: Path) -> bool:
    return (path / "train" / "good").is_dir()


def normal_images(data: str | Path) -> list[Path]:
    """The good images to train on: `train/good` of an MVTec category, else every image under the folder."""
    data = Path(data)
    if not data.exists():
        raise DiffinspectError(f"data folder not found: {data}")
    folder = data / "train" / "good" if is_mvtec_category(data) else data
    images = list_images(folder)
    if not images:
        raise DiffinspectError(f"no images (png, jpg, bmp, tif) found under {folder}")
    return images


@dataclass
class TestSample:
    path: Path
    defect: str  # "good" or the defect type
    mask: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"


@dataclass
class LabelledSet:
    """A labelled test set: MVTec `test/<type>` (+ `ground_truth`), or a folder with `good/` and defect folders."""

    name: str
    samples: list[TestSample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def labelled_set(root: str | Path) -> LabelledSet:
    root = Path(root)
    if not root.is_dir():
        raise DiffinspectError(f"dataset folder not found: {root}")
    test = root / "test" if (root / "test").is_dir() else root
    if not (test / "good").is_dir():
        if (root / "train").is_dir():
            raise DiffinspectError(f"{root} has no test/ folder with good/ and defect folders")
        raise DiffinspectError(f"{root} has no good/ folder: expected MVTec layout or good/ plus defect folders")
    out = LabelledSet(name=root.name)
    gt_root = root / "ground_truth"
    for sub in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for img in list_images(sub):
            mask = None
            if sub.name != "good":
                for cand in (gt_root / sub.name / f"{img.stem}_mask.png", gt_root / sub.name / f"{img.stem}.png"):
                    if cand.exists():
                        mask = cand
                        break
            out.samples.append(TestSample(img, sub.name, mask))
    if gt_root.is_dir():
        known = {(s.defect, s.path.stem) for s in out.samples}
        for m in sorted(gt_root.glob("*/*.png")):
            stem = m.stem.removesuffix("_mask")
            if (m.parent.name, stem) not in known:
                out.warnings.append(f"mask without an image: {m}")
    if not any(s.is_anomalous for s in out.samples):
        out.warnings.append(f"{root} holds no defective images: AUROC is not defined")
    return out
