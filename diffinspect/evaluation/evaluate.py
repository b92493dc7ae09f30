"""Offline evaluation (`inspect evaluate`): detectors and classical baselines on labelled images.

Every method is scored on the same test images, read once per batch: the bundle's diffusion detector,
its COPOD fallback and the baselines (IForest, OCSVM, COPOD on downscaled pixels with PCA and on
classical embeddings). Metrics come from metrics.py, files from report.py.

What a detector must offer (the `Detector` protocol): `score(frames) -> Scored(scores, maps)` on uint8
frames as read in `preprocess.color`; `threshold` (NG strictly above); `preprocess` (its ROI/resize, used
to put ground-truth masks on the map grid); `pixel_threshold`, `name`, `backend`. Optional: `embed(frames)`
(classical features for the embedding baselines), `calibration_n` or `n_calibration` and
`false_reject_rate` (for the sentence on how the threshold was set).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from diffinspect import DiffinspectError
from diffinspect.data.datasets import (
    LabelledSet,
    TestSample,
    is_mvtec_category,
    labelled_set,
    list_images,
    normal_images,
)
from diffinspect.data.image import ImageError, Preprocess, read_image
from diffinspect.data.reading import read_images, skipped_message
from diffinspect.evaluation import metrics
from diffinspect.evaluation.baselines import KINDS, EmbeddingBaseline, PixelBaseline
from diffinspect.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from diffinspect.evaluation.report import GalleryItem, MethodView, summarize, write_report
from diffinspect.scoring.detector import Detector
from diffinspect.scoring.inspector import Inspector
from diffinspect.scoring.threshold import describe_bound

Embedder = Callable[[list[np.ndarray]], np.ndarray]
DEFAULT_ALPHA = 0.05  # baselines' target false-reject rate when no detector says what the line uses


@dataclass
class Method:
    """One scored method. `features` names the shared step that turns frames into its input."""

    name: str
    kind: str  # "detector" | "baseline"
    features: str
    score: Callable[[object], tuple[np.ndarray, np.ndarray | None]]
    threshold: float | None
    preprocess: Preprocess | None = None
    pixel_threshold: float | None = None
    backend: str = ""
    calibration: str | None = None
    inspector: Inspector | None = None  # detectors: what gives the gallery its maps on the frame grid


@dataclass
class Featurizer:
    color: str
    fn: Callable[[list[np.ndarray]], object]


@dataclass
class Scores:
    """One method's output over a test set; pairs are (map, mask) on the map grid, None where unknown."""

    scores: np.ndarray
    pairs: list[tuple[np.ndarray, np.ndarray] | None] | None
    seconds: float


@dataclass
class DatasetSpec:
    name: str
    test: LabelledSet
    train: list[Path] | None
    notes: list[str] = field(default_factory=list)


def evaluate(
    bundles: Sequence[str | Path],
    datasets: Sequence[str | Path],
    report_dir: str | Path,
    baselines: Sequence[str] = KINDS,
    backend: str = "auto",
    device: str = "auto",
    one_class: str | None = None,
    robustness: bool = False,
    train_dirs: Sequence[str | Path | None] | None = None,
    *,
    detectors: Mapping[str, Detector] | None = None,
    embedder: Embedder | None = None,
    alpha: float | None = None,
    batch_size: int = 16,
    train_share: float = 0.5,
    calib_share: float = 0.2,
    seed: int = 0,
    gallery_size: int = 6,
    progress: bool = True,
) -> dict:
    """Evaluate bundles (and/or pre-loaded `detectors`) and baselines on datasets; write the report.

    datasets: MVTec categories or folders with good/ and defect folders; with one_class, folders of
    class folders (ROOT/<class>/*.png) where one_class is normal and every other class an anomaly.
    train_dirs: good images for the baselines, one per dataset (or one for all); default: an MVTec
    category's train/good, or the one-class training share. Returns the report dict (report.json).
    """
    if not datasets:
        raise DiffinspectError("no dataset to evaluate")
    with _progress(progress) as bar:  # from the start: loading and fitting take minutes too
        notes: list[str] = []
        models: dict[str, dict] = {}
        task = bar.add("loading the model(s) and checking their backends", None) if bundles else None
        dets = _load_detectors(bundles, backend, device, notes, models)
        bar.finish(task)
        for name, det in (detectors or {}).items():
            dets[_unique(name, dets)] = det
        kinds = _baseline_names(baselines)
        if alpha is None:
            # Named by where it came from, not by its value: a line calibrated at 5 % is not "the default".
            detector_alpha = _detector_alpha(dets)
            alpha = DEFAULT_ALPHA if detector_alpha is None else detector_alpha
            source = "the default" if detector_alpha is None else "the detector's target"
        else:
            source = "as asked"
        if kinds:
            notes.append(f"baseline thresholds target a false-reject rate of {alpha:g} ({source})")
        embed_fn, embed_color = _embedder(embedder, dets, notes)
        train_list = _train_dirs(train_dirs, len(datasets))
        report: dict = {"models": models, "datasets": {}, "summary": {}, "notes": notes}
        views: dict[str, list[MethodView]] = {}
        for root, train_dir in zip(datasets, train_list, strict=True):
            spec = _dataset_spec(Path(root), one_class, train_dir, train_share, seed)
            name = _unique(spec.name, report["datasets"])
            methods = [_detector_method(n, d) for n, d in dets.items()]
            # Detectors take frames as read in their colour mode: the identity feature step.
            feats = {m.features: Featurizer(_color(m), _identity) for m in methods}
            task = bar.add(f"{name}: fitting {len(kinds)} baseline(s)", None) if kinds else None
            methods += _fit_baselines(spec, kinds, alpha, calib_share, seed, embed_fn, embed_color,
                                      _roi_crop(dets), feats, batch_size)
            bar.finish(task)
            if not methods:
                raise DiffinspectError("nothing to evaluate: give a bundle or keep at least one baseline")
            results, views[name] = _evaluate_dataset(spec, methods, feats, robustness, batch_size, seed,
                                                     gallery_size, bar)
            report["datasets"][name] = results
            notes.extend(f"{name}: {n}" for n in spec.notes)
        notes.extend(_general_notes(robustness))
        report["summary"] = summarize(report["datasets"])
        notes[:0] = _beaten(report["datasets"])
        report["notes"] = list(dict.fromkeys(notes))  # keep order, drop repeats
        write_report(report, views, Path(report_dir))
    return report


# --- setting up datasets and methods -------------------------------------------------------------

def _unique(name: str, taken: Mapping[str, object]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    return out


def _train_dirs(train_dirs: Sequence[str | Path | None] | None, n: int) -> list[Path | None]:
    if not train_dirs:
        return [None] * n
    if len(train_dirs) == 1:
        return [Path(train_dirs[0]) if train_dirs[0] else None] * n
    if len(train_dirs) != n:
        raise DiffinspectError(f"{len(train_dirs)} training folders for {n} datasets: "
                               "give one, or one per dataset")
    return [Path(t) if t else None for t in train_dirs]


def _baseline_names(baselines: Sequence[str]) -> list[str]:
    """Kinds expand to both variants (iforest -> iforest_pixels, iforest_embed); full names pick one."""
    names: list[str] = []
    for b in baselines:
        if b in KINDS:
            names += [f"{b}_pixels", f"{b}_embed"]
        elif b.rsplit("_", 1)[0] in KINDS and b.rsplit("_", 1)[-1] in ("pixels", "embed"):
            names.append(b)
        else:
            raise DiffinspectError(f"unknown baseline {b!r}: choose from {', '.join(KINDS)} "
                                   "(or e.g. iforest_pixels, copod_embed)")
    return list(dict.fromkeys(names))


def _load_detectors(bundles: Sequence[str | Path], backend: str, device: str,
                    notes: list[str], models: dict[str, dict] | None = None) -> dict[str, Detector]:
    if not bundles:
        return {}
    from diffinspect.bundle import Bundle
    from diffinspect.info import training_warning
    from diffinspect.scoring.loader import load_detector  # lazy: pulls in the backends

    out: dict[str, Detector] = {}
    for bundle in bundles:
        bundle = Path(bundle)
        prefix = "" if len(bundles) == 1 else f"{bundle.name}_"
        # Not caught: an uncalibrated bundle must stop the run with the loader's message.
        det = load_detector(bundle, "diffusion", backend, device)
        if getattr(det, "name", "") == "copod":
            notes.append(f"{bundle}: no diffusion model in the bundle, only the COPOD fallback is evaluated")
        else:
            name = _unique(bundle.name if prefix else "diffinspect", out)
            out[name] = det
            manifest = Bundle.load(bundle, verify=False).manifest
            warning = training_warning(manifest)
            engine = getattr(det, "engine", None)
            if models is not None:
                models[name] = {"bundle": str(bundle.resolve()),
                                "training_steps": manifest.training and manifest.training.steps,
                                "engine": getattr(det, "backend", None),
                                "precision": getattr(engine, "precision", None) or "fp32",
                                "warning": warning}
            if warning:
                notes.insert(0, f"WARNING, {name}: {warning}")
        out[_unique(f"{prefix}copod_fallback", out)] = load_detector(bundle, "copod")
        notes.extend(_suspect_notes(bundle))
    return out


def _suspect_notes(bundle: Path) -> list[str]:
    """The calibration images `inspect calibrate` flagged as likely defective, and those it excluded."""
    from diffinspect.bundle import Bundle
    from diffinspect.scoring.suspects import SUSPECTS_FILE, load_suspects

    b = Bundle.load(bundle, verify=False)
    if not b.has(SUSPECTS_FILE):
        return []
    found = load_suspects(b.file(SUSPECTS_FILE).read_bytes())
    out = [f"{bundle}: calibration image {s['image']} looks defective (score {s['score']:.4g}, p = "
           f"{s['p_value']:.2g}; {found['rule']}): check it, or calibrate with --exclude-suspects"
           for s in found["suspects"]]
    out += [f"{bundle}: calibration image {s['image']} was excluded as a suspect (p = {s['p_value']:.2g})"
            for s in found["excluded"]]
    return out or [f"{bundle}: no calibration image looks defective ({found['rule']})"]


def _beaten(datasets: dict) -> list[str]:
    """A note for each dataset where a classical baseline has a higher image AUROC than a detector."""
    out = []
    for ds, rows in datasets.items():
        base = {m: r["image_auroc"] for m, r in rows.items() if r.get("kind") != "detector"
                and r.get("image_auroc") is not None}
        if not base:
            continue
        best = max(base, key=base.get)
        for m, r in rows.items():
            if r.get("kind") == "detector" and r.get("image_auroc") is not None and base[best] > r["image_auroc"]:
                out.append(f"WARNING, {ds}: the baseline {best} (image AUROC {base[best]:.3f}) beats {m} "
                           f"({r['image_auroc']:.3f})")
    return out


def _detector_alpha(dets: Mapping[str, Detector]) -> float | None:
    """The first detector's target false-reject rate; None when no detector states one."""
    for det in dets.values():
        rate = getattr(det, "false_reject_rate", None)
        if isinstance(rate, float) and 0 < rate < 1:
            return rate
    return None


def _embedder(embedder: Embedder | None, dets: Mapping[str, Detector],
              notes: list[str]) -> tuple[Embedder | None, str]:
    """Explicit embedder, else a detector's .embed (the COPOD fallback), else features.embed_frames.

    The returned function takes whole frames: a detector's .embed crops its own ROI; the others get
    the first detector's ROI crop here so every baseline looks at the same pixels.
    """
    color = next((d.preprocess.color for d in dets.values()), "rgb")
    if embedder is None:
        for det in dets.values():
            if callable(getattr(det, "embed", None)):
                return det.embed, det.preprocess.color
        try:
            from diffinspect.scoring.features import embed_frames as embedder
        except ImportError:
            notes.append("no classical embedding available: *_embed baselines skipped")
            return None, color
    crop = _roi_crop(dets)
    fn = embedder
    return (lambda frames: fn([crop(f) for f in frames])), color


def _dataset_spec(root: Path, one_class: str | None, train_dir: Path | None, train_share: float,
                  seed: int) -> DatasetSpec:
    if one_class is not None:
        spec = _one_class_spec(root, one_class, train_share, seed)
        if train_dir is not None:
            spec.train = normal_images(train_dir)
        return spec
    test = labelled_set(root)
    spec = DatasetSpec(test.name, test, None, list(test.warnings))
    if train_dir is not None:
        spec.train = normal_images(train_dir)
    elif is_mvtec_category(root):
        spec.train = normal_images(root)
    else:
        spec.notes.append("no training good images (no train/good, no train_dirs): baselines skipped")
    return spec


def _one_class_spec(root: Path, cls: str, train_share: float, seed: int) -> DatasetSpec:
    """ROOT/<class>/ images: `cls` is normal (a seeded share trains the baselines), the others anomalies."""
    if not root.is_dir():
        raise DiffinspectError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if cls not in classes:
        found = ", ".join(classes) or "none"
        raise DiffinspectError(f"class {cls!r} not found under {root}; classes: {found}")
    if len(classes) < 2:
        raise DiffinspectError(f"{root} holds only class {cls!r}: the one-class protocol needs other classes")
    normal = list_images(root / cls)
    if len(normal) < 2:
        raise DiffinspectError(f"class {cls!r} under {root} holds {len(normal)} images: need at least 2")
    if not 0 < train_share < 1:
        raise DiffinspectError(f"train share must be between 0 and 1, got {train_share}")
    order = np.random.default_rng(seed).permutation(len(normal))
    n_train = min(max(round(train_share * len(normal)), 1), len(normal) - 1)
    train = [normal[i] for i in sorted(order[:n_train])]
    test = LabelledSet(name=f"{root.name}[{cls}]")
    test.samples = [TestSample(normal[i], "good") for i in sorted(order[n_train:])]
    for c in classes:
        if c != cls:
            # A folder literally named "good" is an anomaly class here; keep it apart from the normal label.
            defect = c if c != "good" else "class_good"
            test.samples += [TestSample(p, defect) for p in list_images(root / c)]
    note = (f"one-class protocol: class {cls!r} is normal ({n_train} images train/calibrate the baselines, "
            f"{len(normal) - n_train} are test good), the other {len(classes) - 1} classes are anomalies")
    return DatasetSpec(test.name, test, train, [note])


def _color(m: Method) -> str:
    return m.features.split(":", 1)[1] if m.features.startswith("frames:") else "rgb"


def _identity(frames: list[np.ndarray]) -> list[np.ndarray]:
    return frames


def _detector_method(name: str, det: Detector) -> Method:
    inspector = Inspector(det)

    def score(frames: object) -> tuple[np.ndarray, list[np.ndarray] | None]:
        verdicts = inspector.inspect(frames)  # type: ignore[arg-type]
        failed = next((v.error for v in verdicts if v.score is None), None)
        if failed is not None:
            raise DiffinspectError(f"{name}: {failed}")
        maps = [_plain(v.grid_map) for v in verdicts]
        # Raw scores, NaN included: the metrics count an unscorable frame, the line labels it error.
        return np.array([v.score for v in verdicts], np.float64), None if any(m is None for m in maps) else maps

    n = getattr(det, "calibration_n", None) or getattr(det, "n_calibration", None)
    rate = getattr(det, "false_reject_rate", None)
    term = getattr(det, "frame_term", None)
    rule = "best-rank" if getattr(term, "rule", None) == "minp" else "split"
    confidence = getattr(det, "confidence", None)  # set: the calibration-conditional threshold
    delta = None if confidence is None else 1 - confidence
    calibration = describe_bound(int(n), float(rate), rule, delta) if n and rate else None
    return Method(name, "detector", f"frames:{det.preprocess.color}", score, det.threshold, det.preprocess,
                  det.pixel_threshold, str(getattr(det, "backend", "")), calibration, inspector)


def _plain(amap: np.ndarray | None) -> np.ndarray | None:
    """A frame's map as 2-D float32 (a detector may give (1, H, W) or (H, W, 1))."""
    if amap is None:
        return None
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim == 3:
        amap = amap[..., 0] if amap.shape[-1] == 1 else amap[0]
    return amap


def _roi_crop(dets: Mapping[str, Detector]) -> Callable[[np.ndarray], np.ndarray]:
    """Baselines look at the same ROI as the first detector (nothing to crop without one)."""
    pre = next((d.preprocess for d in dets.values()), None)
    return pre.crop_roi if pre is not None and pre.roi else (lambda f: f)


def _fit_baselines(spec: DatasetSpec, names: list[str], alpha: float, calib_share: float, seed: int,
                   embed_fn: Embedder | None, embed_color: str, crop: Callable[[np.ndarray], np.ndarray],
                   feats: dict[str, Featurizer], batch_size: int) -> list[Method]:
    """Fit the baselines on the dataset's good training images; register their shared feature steps."""
    if not names or spec.train is None:
        return []
    methods: list[Method] = []
    pixel_names = [n for n in names if n.endswith("_pixels")]
    if pixel_names:
        prep = PixelBaseline("iforest")  # only for .pixels(): every pixel baseline shares the same input
        feats["pixels"] = Featurizer("gray", lambda fr: prep.pixels([crop(f) for f in fr]))
        train_px = _features_of(spec.train, feats["pixels"], batch_size)
        for n in pixel_names:
            px = PixelBaseline(n.split("_")[0], alpha=alpha, calib_share=calib_share, seed=seed)
            methods.append(_baseline_method(n, "pixels", px.fit(train_px)))
    embed_names = [n for n in names if n.endswith("_embed")]
    if embed_names and embed_fn is not None:
        feats["embed"] = Featurizer(embed_color, embed_fn)
        train_emb = _features_of(spec.train, feats["embed"], batch_size)
        for n in embed_names:
            em = EmbeddingBaseline(n.split("_")[0], alpha=alpha, calib_share=calib_share, seed=seed)
            methods.append(_baseline_method(n, "embed", em.fit(train_emb)))
    return methods


def _features_of(paths: list[Path], feat: Featurizer, batch_size: int) -> np.ndarray:
    # In batches, so a large training set never sits in memory as full-size frames.
    parts = [np.asarray(feat.fn(read_images(paths[i:i + batch_size], feat.color, "baseline training images").frames))
             for i in range(0, len(paths), batch_size)]
    return np.concatenate(parts)


def _baseline_method(name: str, features: str, bl: PixelBaseline | EmbeddingBaseline) -> Method:
    note = describe_bound(bl.calibration_n, bl.alpha_) + "; these images were held out of the baseline's fit"
    if bl.alpha_ != bl.false_reject_rate:
        note += f" (too few for the requested rate {bl.false_reject_rate:g})"
    return Method(name, "baseline", features, lambda x: (bl.decision_function(x), None), bl.threshold_,
                  calibration=note)


# --- scoring ---------------------------------------------------------------------------------------

def _read(path: Path, color: str) -> np.ndarray:
    try:
        return read_image(path, color)
    except ImageError as exc:
        raise ImageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def _read_mask(path: Path | None, shape: tuple[int, int], notes: list[str]) -> np.ndarray | None:
    if path is None:
        return None
    m = read_image(path, "gray")[..., 0] > 127
    if m.shape != shape:
        # Masks are drawn on the frame grid; if a tool saved them at another size, nearest keeps them binary.
        notes.append(f"ground-truth masks of another size than their images (e.g. {path.name}) resized "
                     "to the image with nearest-neighbour")
        m = metrics.resize_mask(m, shape)
    return m


def mask_on_map(mask: np.ndarray, amap: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Bring a frame-grid mask onto a detector's map grid, as `Preprocess.fit` brings the frame.

    Returns (map part, mask) of equal shape. ROI crop, centre crop and letterbox are applied to the mask
    as to the frame, then nearest-neighbour resizing; for letterboxed maps the padding (no frame pixels)
    is cut from the map instead, as is the padding of a tiles canvas. Pixels outside the ROI or the centre
    crop are not evaluated.
    """
    m = pre.crop_roi(mask)
    h, w = m.shape[:2]
    mh, mw = amap.shape
    if pre.feed == "tiles":
        sh, sw = pre.scaled_shape(h, w)
        amap = amap[:sh, :sw]  # the canvas padding holds no frame pixels
    elif pre.resize == "crop":
        bh, bw, y0, x0 = pre.box(h, w)
        m = m[y0:y0 + bh, x0:x0 + bw]
    elif pre.resize == "pad":
        bh, bw, y0, x0 = pre.box(h, w)
        r0, r1 = round(y0 * mh / bh), round((y0 + h) * mh / bh)
        c0, c1 = round(x0 * mw / bw), round((x0 + w) * mw / bw)
        amap = amap[r0:max(r1, r0 + 1), c0:max(c1, c0 + 1)]
    return amap, metrics.resize_mask(m, amap.shape)


def _evaluate_dataset(spec: DatasetSpec, methods: list[Method], feats: dict[str, Featurizer],
                      robustness: bool, batch_size: int, seed: int, gallery_size: int,
                      bar: _Bar) -> tuple[dict, list[MethodView]]:
    samples = spec.test.samples
    # Maps are kept only where masks make pixel metrics possible (the gallery re-scores its few frames).
    with_masks = any(s.mask is not None for s in samples)
    skipped: list[tuple[Path, str]] = []
    clean = _score_set(samples, methods, feats, batch_size, bar, spec.name, with_masks, spec.notes,
                       skipped=skipped)
    if skipped:  # undecodable test images are left out of every figure, and named in the report
        spec.notes.append(skipped_message(skipped, "test images"))
        bad = {p for p, _ in skipped}
        samples = [s for s in samples if s.path not in bad]
    labels = np.array([s.is_anomalous for s in samples], dtype=bool)
    n_unmasked = sum(s.is_anomalous and s.mask is None for s in samples)
    if with_masks:
        if n_unmasked:
            spec.notes.append(f"{n_unmasked} defective images have no ground-truth mask: "
                              "left out of pixel metrics")
    elif labels.any() and any(m.kind == "detector" for m in methods):
        spec.notes.append("no ground-truth masks: pixel AUROC and AUPRO not defined")
    results = {m.name: _method_metrics(m, clean[m.name], samples, labels) for m in methods}
    if robustness:
        for kind in CORRUPTIONS:
            for sev in SEVERITIES:
                out = _score_set(samples, methods, feats, batch_size, bar, f"{spec.name} {kind} s{sev}",
                                 False, spec.notes, corruption=(kind, sev, seed))
                for m in methods:
                    th = metrics.threshold_metrics(labels, out[m.name].scores, m.threshold)
                    results[m.name].setdefault("robustness", {}).setdefault(kind, {})[str(sev)] = {
                        "image_auroc": metrics.image_auroc(labels, out[m.name].scores),
                        "false_reject_rate": th["false_reject_rate"],
                    }
    shown = {m.name for m in methods if m.kind == "detector"}
    if not shown:
        ranked = [m.name for m in methods if results[m.name]["image_auroc"] is not None]
        shown = {max(ranked, key=lambda n: results[n]["image_auroc"])} if ranked else set()
    views = [_view(m, clean[m.name], samples, labels, gallery_size if m.name in shown else 0, spec.notes)
             for m in methods]
    return results, views


def _score_set(samples: list[TestSample], methods: list[Method], feats: dict[str, Featurizer],
               batch_size: int, bar: _Bar, label: str, pixel_pairs: bool, notes: list[str],
               corruption: tuple[str, int, int] | None = None,
               skipped: list[tuple[Path, str]] | None = None) -> dict[str, Scores]:
    """Score every method on the samples, batch by batch; each frame is read once per colour. A sample
    that cannot be read is left out and added to `skipped`."""
    used = {m.features for m in methods}
    feats = {k: f for k, f in feats.items() if k in used}
    colors = {f.color for f in feats.values()}
    scores: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    pairs: dict[str, list] = {m.name: [] for m in methods}
    seconds = dict.fromkeys([m.name for m in methods] + list(feats), 0.0)
    if corruption is None and samples:
        _warm_up(samples[0], methods, feats)
    task = bar.add(label, len(samples))
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        read = {c: read_images([s.path for s in batch], c, "test images") for c in colors}
        bad = {p: why for r in read.values() for p, why in r.skipped}
        if bad:
            if skipped is not None:
                skipped.extend(bad.items())
            batch = [s for s in batch if s.path not in bad]
        frames = {c: [f for f, p in zip(r.frames, r.paths, strict=True) if p not in bad] for c, r in read.items()}
        if not batch:
            bar.advance(task, len(bad))
            continue
        if corruption is not None:
            kind, sev, sd = corruption
            # Seeded per image (not per method): every method sees the same corrupted frame.
            seed_key = [sd, CORRUPTIONS.index(kind), sev]
            frames = {c: [corrupt(f, kind, sev, np.random.default_rng([*seed_key, start + i]))
                          for i, f in enumerate(fs)] for c, fs in frames.items()}
        inputs = {}
        for key, feat in feats.items():
            t0 = time.perf_counter()
            inputs[key] = feat.fn(frames[feat.color])
            seconds[key] += time.perf_counter() - t0
        masks = None
        for m in methods:
            t0 = time.perf_counter()
            s, mp = m.score(inputs[m.features])
            seconds[m.name] += time.perf_counter() - t0
            if len(s) != len(batch):
                raise DiffinspectError(f"{m.name} returned {len(s)} scores for {len(batch)} frames")
            scores[m.name].append(s)
            if pixel_pairs and mp is not None and m.preprocess is not None:
                if masks is None:
                    shapes = [f.shape[:2] for f in frames[_color(m)]]
                    masks = [_read_mask(smp.mask, shp, notes) for smp, shp in zip(batch, shapes, strict=True)]
                for smp, amap, mask, fr in zip(batch, mp, masks, frames[_color(m)], strict=True):
                    if smp.is_anomalous and mask is None:
                        pairs[m.name].append(None)
                    else:
                        full = mask if mask is not None else np.zeros(fr.shape[:2], dtype=bool)
                        pairs[m.name].append(mask_on_map(full, amap, m.preprocess))
        bar.advance(task, len(batch) + len(bad))
    out = {}
    for m in methods:
        out[m.name] = Scores(np.concatenate(scores[m.name]) if scores[m.name] else np.zeros(0),
                             pairs[m.name] or None, seconds[m.name] + seconds[m.features])
    return out


def _warm_up(sample: TestSample, methods: list[Method], feats: dict[str, Featurizer]) -> None:
    # First calls pay for lazy initialization (sessions, caches): keep that out of the latency figure.
    detectors = [m for m in methods if m.kind == "detector"]
    try:
        frames = {c: [_read(sample.path, c)] for c in {_color(m) for m in detectors}}
    except ImageError:
        return  # an undecodable first image: scoring skips and names it
    for m in detectors:
        m.score(frames[_color(m)])


# --- metrics and views -----------------------------------------------------------------------------

def _method_metrics(m: Method, res: Scores, samples: list[TestSample], labels: np.ndarray) -> dict:
    n = len(samples)
    out: dict = {"kind": m.kind, "backend": m.backend or None, "threshold": m.threshold,
                 "calibration": m.calibration, "n_images": n, "n_good": int((~labels).sum()),
                 "n_defective": int(labels.sum())}
    out.update(_scores_metrics(labels, res.scores, m.threshold, res.pairs))
    out["f1_max_test_tuned"] = metrics.f1_max(labels, res.scores)
    out["latency_ms"] = 1000.0 * res.seconds / n if n else None
    per_defect = {}
    defects = np.array([s.defect for s in samples])
    for d in sorted(set(defects[labels])):
        subset = (defects == d) | ~labels
        row = _scores_metrics(labels[subset], res.scores[subset], m.threshold, _subset(res.pairs, subset))
        per_defect[d] = {"n": int((defects == d).sum()), "image_auroc": row["image_auroc"],
                         "image_ap": row["image_ap"], "recall": row["recall"], "miss_rate": row["miss_rate"],
                         "pixel_auroc": row["pixel_auroc"], "aupro": row["aupro"]}
    out["per_defect"] = per_defect
    return out


def _subset(pairs: list | None, keep: np.ndarray) -> list | None:
    return None if pairs is None else [p for p, k in zip(pairs, keep, strict=True) if k]


def _scores_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None,
                    pairs: list | None) -> dict:
    out = {"image_auroc": metrics.image_auroc(labels, scores), "image_ap": metrics.image_ap(labels, scores),
           "pixel_auroc": None, "aupro": None}
    known = [p for p in (pairs or []) if p is not None]
    if known:
        maps_, masks_ = [p[0] for p in known], [p[1] for p in known]
        out["pixel_auroc"] = metrics.pixel_auroc(maps_, masks_)
        out["aupro"] = metrics.aupro(maps_, masks_)
    th = metrics.threshold_metrics(labels, scores, threshold)
    out.update({k: th[k] for k in ("false_reject_rate", "miss_rate", "precision", "recall", "f1")})
    # Counts beside the rates: "missed 238 of 392" is what a quality engineer acts on.
    out["false_rejects"], out["misses"] = th.get("fp"), th.get("fn")
    return out


def _view(m: Method, res: Scores, samples: list[TestSample], labels: np.ndarray, k: int,
          notes: list[str]) -> MethodView:
    view = MethodView(m.name, m.kind, labels, res.scores, m.threshold)
    if m.threshold is None or k <= 0:
        return view
    s = res.scores
    good_ng = [i for i in np.argsort(-s, kind="stable") if not labels[i] and s[i] > m.threshold][:k]
    bad_ok = [i for i in np.argsort(s, kind="stable") if labels[i] and s[i] <= m.threshold][:k]
    view.false_rejects = [_gallery_item(m, samples[i], float(s[i]), "ng", notes) for i in good_ng]
    view.misses = [_gallery_item(m, samples[i], float(s[i]), "ok", notes) for i in bad_ok]
    return view


def _gallery_item(m: Method, sample: TestSample, score: float, label: str, notes: list[str]) -> GalleryItem:
    frame = _read(sample.path, _color(m))
    image = None
    # Re-scoring a handful of frames is cheaper than holding every map of a large test set in memory;
    # the caption and label keep the score from the evaluation run.
    verdict = m.inspector.inspect([frame])[0] if m.inspector is not None else None
    amap = verdict.map if verdict is not None else None
    if amap is not None:
        try:
            from diffinspect.scoring.overlay import render_overlay
        except ImportError:
            render_overlay = None
            notes.append("overlay module not available: galleries show plain frames")
        if render_overlay is not None:
            try:
                image = render_overlay(frame, amap, score, m.threshold, label, m.pixel_threshold)
            except Exception as exc:  # a drawing bug must not throw away a finished evaluation
                notes.append(f"overlay failed ({type(exc).__name__}: {exc}): galleries show plain frames")
    if image is None:
        image = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR if frame.shape[2] == 1 else cv2.COLOR_RGB2BGR)
    caption = f"{sample.path.name} ({sample.defect}) score {score:.3g}"
    if verdict is not None and verdict.p_value is not None:  # a plant may reject at its own alpha: p <= alpha
        caption += f", p = {verdict.p_value:.2g}"
    return GalleryItem(caption, image)


# --- notes -----------------------------------------------------------------------------

def _general_notes(robustness: bool) -> list[str]:
    notes = [
        "pixel metrics are computed on each detector's anomaly-map grid (cheaper than upscaling maps to "
        "full frames): ground-truth masks are ROI-cropped and cropped/letterboxed like the frames and "
        "resized with nearest-neighbour; pixels outside the ROI or centre crop are not evaluated",
        "AUPRO: per-region overlap over 8-connected ground-truth regions, integrated up to 30 % FPR of "
        "defect-free pixels and divided by 0.3",
        "f1_max_test_tuned is the best F1 over thresholds chosen on the test set itself (optimistic, for "
        "comparison with papers); every other threshold figure uses the calibrated threshold",
        "latency_ms: wall time per frame of the scoring call (baselines: feature step + model), image "
        "decoding excluded, after one warm-up call",
        "baselines (arXiv 2412.07539): IForest, OCSVM (nu=0.1, gamma=scale, standardized) and COPOD on "
        "64 px grayscale pixels reduced by PCA to 50 components (*_pixels) or on classical embeddings "
        "(*_embed), fitted on good training images only",
    ]
    if robustness:
        notes.append("robustness: test images re-scored under each corruption at severities 1-3 (same "
                     "corrupted frames for every method); thresholds are the clean calibrated ones")
    return notes


# --- progress --------------------------------------------------------------------------------------

class _Bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def add(self, label: str, total: int | None) -> int | None:
        """A task; total None shows a pulsing bar for work of unknown length."""
        return None if self.progress is None else self.progress.add_task(label, total=total)

    def finish(self, task: int | None) -> None:
        if self.progress is not None and task is not None:
            self.progress.update(task, total=1, completed=1)

    def advance(self, task: int | None, n: int) -> None:
        if self.progress is not None and task is not None:
            self.progress.advance(task, n)


def _progress(enabled: bool) -> _Bar:
    return _Bar(enabled)
