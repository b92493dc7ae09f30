"""Ablation of the anomaly-map recipe on a labelled category, for one trained bundle.

Raw per-pixel terms are computed once per t* (pixel L1, 1-SSIM, denoiser feature distance, and a
per-location Gaussian of clean denoiser features), then every combination of terms, normalization,
blur and image-score rule is evaluated in numpy. Prints image AUROC (and pixel AUROC where masks exist).

    python bench/ablation.py BUNDLE CATEGORY [--t-star 50,100,250] [--draws 1]
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.models.from_bundle import load_denoiser
from diffinspect.models.scoring import Recipe, ScoringGraph, gaussian_kernel, separable_blur
from diffinspect.scoring.diffusion import Stats, fit_frames


def load(paths, prep):
    return fit_frames([read_image(p, prep.color) for p in paths], prep)


@torch.no_grad()
def raw_terms(graph: ScoringGraph, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(frames), batch):
        out.append(graph.raw_terms(torch.from_numpy(frames[i:i + batch])).numpy())
    return np.concatenate(out)


@torch.no_grad()
def clean_features(model, frames: np.ndarray, batch: int = 32) -> list[np.ndarray]:
    levels: list[list[np.ndarray]] = []
    for i in range(0, len(frames), batch):
        x = torch.from_numpy(frames[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        feats = model.features(x, torch.zeros(x.shape[0]))
        for j, f in enumerate(feats):
            if len(levels) <= j:
                levels.append([])
            levels[j].append(f.numpy())
    return [np.concatenate(lv) for lv in levels]


def gauss_term(ref: list[np.ndarray], test: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Per-location diagonal Gaussian of clean features: mean z^2 over channels, upsampled, averaged."""
    total = 0
    for r, t in zip(ref, test, strict=True):
        mu, sd = r.mean(0), r.std(0) + 1e-3 * r.std() + 1e-6
        z2 = (((t - mu) / sd) ** 2).mean(1)
        total = total + F.interpolate(torch.from_numpy(z2)[:, None], size=size, mode="bilinear").numpy()[:, 0]
    return total / len(ref)


def normalize(raw_ref: np.ndarray, raw: np.ndarray, mode: str) -> np.ndarray:
    if mode == "pixel":
        s = Stats.fit(raw_ref)
        return (raw - s.mean) / s.std
    mean = raw_ref.mean(axis=(0, 2, 3), keepdims=True)[0]
    std = raw_ref.std(axis=(0, 2, 3), keepdims=True)[0]
    return (raw - mean) / std


def blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return maps
    return separable_blur(torch.from_numpy(maps.astype(np.float32))[:, None], gaussian_kernel(sigma)).numpy()[:, 0]


def image_scores(maps: np.ndarray, rule: str) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    if rule == "max":
        return flat.max(1)
    if rule == "top1+mean":
        k = max(1, int(0.01 * flat.shape[1]))
        return np.sort(flat, 1)[:, -k:].mean(1) + flat.mean(1)
    if rule.startswith("top"):
        k = max(1, int(float(rule[3:]) / 100 * flat.shape[1]))
        return np.sort(flat, 1)[:, -k:].mean(1)
    raise ValueError(rule)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    if masks.max() == 0:
        return None
    return float(roc_auc_score(masks.ravel() > 0, maps.ravel()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("category")
    ap.add_argument("--t-star", default="50,100,250")
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--max-reference", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    b = Bundle.load(args.bundle)
    prep = b.manifest.preprocess
    size = prep.hw
    ref_paths = b.manifest.training.paths_on_disk()
    rng = np.random.default_rng(0)
    ref_paths = [ref_paths[i] for i in sorted(rng.choice(len(ref_paths), min(args.max_reference, len(ref_paths)),
                                                          replace=False))]
    test = labelled_set(args.category)
    t0 = time.time()
    ref = load(ref_paths, prep)
    frames = load([s.path for s in test.samples], prep)
    labels = np.array([s.is_anomalous for s in test.samples])
    masks = np.zeros((len(test.samples), *size), np.float32)
    for i, s in enumerate(test.samples):
        if s.mask is not None:
            m = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE)
            m = prep.fit(m[:, :, None].astype(np.uint8))[:, :, 0]
            masks[i] = m > 127
    # Same-day subset for ball_screw: good photos taken on the defects' days.
    has_days = any(re.search(r"_2009(05|06|07)", s.path.name) for s in test.samples)
    sameday = np.array([(not s.is_anomalous and bool(re.search(r"_2009(05|06|07)", s.path.name))) or s.is_anomalous
                        for s in test.samples])
    print(f"loaded {len(ref)} reference, {len(frames)} test images in {time.time() - t0:.0f}s")
    model = load_denoiser(b)
    schedule = b.schedule
    terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for ts in [int(v) for v in args.t_star.split(",")]:
        recipe = Recipe(t_star=ts, noise_draws=args.draws)
        graph = ScoringGraph(model, schedule, recipe)
        t1 = time.time()
        cache = Path(args.bundle) / f".ablation_t{ts}_d{args.draws}.npz"
        if cache.exists():
            with np.load(cache) as z:
                r_ref, r_test = z["ref"], z["test"]
        else:
            r_ref, r_test = raw_terms(graph, ref), raw_terms(graph, frames)
            np.savez(cache, ref=r_ref, test=r_test)
        print(f"t*={ts}: raw terms in {time.time() - t1:.0f}s")
        for j, name in enumerate(graph.term_names):
            terms[f"{name}@{ts}"] = (r_ref[:, j:j + 1], r_test[:, j:j + 1])
    fr, ft = clean_features(model, ref), clean_features(model, frames)
    g_ref = gauss_term(fr, fr, size)[:, None]
    g_test = gauss_term(fr, ft, size)[:, None]
    terms["gauss"] = (g_ref, g_test)

    rows = []
    for name, (r, t) in terms.items():
        for norm in ("pixel", "global"):
            z = normalize(r, t, norm)[:, 0]
            for sigma in (0, 2, 4):
                m = blur(z, sigma)
                for rule in ("max", "top1", "top0.1", "top1+mean"):
                    s = image_scores(m, rule)
                    rows.append((name, norm, sigma, rule, roc_auc_score(labels, s),
                                 roc_auc_score(labels[sameday], s[sameday]) if has_days else None,
                                 pixel_auroc(m, masks)))
    # Combinations of the best single terms, per-pixel normalization.
    names = list(terms)
    for a, c in itertools.combinations(names, 2):
        for norm in ("pixel", "global"):
            z = (normalize(*terms[a], norm) + normalize(*terms[c], norm))[:, 0] / 2
            m = blur(z, 2)
            for rule in ("top1", "top1+mean"):
                s = image_scores(m, rule)
                rows.append((f"{a}+{c}", norm, 2, rule, roc_auc_score(labels, s),
                             roc_auc_score(labels[sameday], s[sameday]) if has_days else None,
                             pixel_auroc(m, masks)))
    # The shipped default: all three reconstruction terms at each t*.
    for ts in [int(v) for v in args.t_star.split(",")]:
        for norm in ("pixel", "global"):
            z = sum(normalize(*terms[f"{n}@{ts}"], norm) for n in ("pixel", "ssim", "feature"))[:, 0] / 3
            for sigma in (0, 2, 4):
                m = blur(z, sigma)
                for rule in ("max", "top1", "top0.1"):
                    s = image_scores(m, rule)
                    rows.append((f"pixel+ssim+feature@{ts}", norm, sigma, rule, roc_auc_score(labels, s),
                                 roc_auc_score(labels[sameday], s[sameday]) if has_days else None,
                                 pixel_auroc(m, masks)))
    rows.sort(key=lambda r: -r[4])
    with open(Path(args.bundle) / ".ablation.tsv", "w") as f:
        for r in rows:
            f.write("\t".join(str(v) for v in r) + "\n")
    print(f"{'terms':34s} {'norm':6s} {'blur':>4s} {'score':10s} {'imgAUROC':>8s} {'sameday':>8s} {'pixAUROC':>8s}")
    for r in rows[:40]:
        same = f"{r[5]:.3f}" if r[5] is not None else "-"
        pix = f"{r[6]:.3f}" if r[6] is not None else "-"
        print(f"{r[0]:34s} {r[1]:6s} {r[2]:4} {r[3]:10s} {r[4]:8.3f} {same:>8s} {pix:>8s}")
    print("best per term family:")
    seen = set()
    for r in rows:
        if r[0] not in seen:
            seen.add(r[0])
            print("  ", r)
    best_pix = max(rows, key=lambda r: r[6] or 0)
    print("best pixel AUROC:", best_pix)


if __name__ == "__main__":
    main()
