"""Self-trained patch features: the denoiser's own encoder activations as patch embeddings (issue 21, item 1).

For calibrated bundles and their labelled categories, every arm scores the same bundle (same weights,
same training steps), so the arms differ only in scoring:

- bundle: the bundle as calibrated (its map; its score fused with the frame term's embedding Gaussian by
  the full-conformal best-rank rule).
- diffusion, diffusion+emb: the rebuild terms alone (pixel, SSIM, feature; a bundle's patch term left
  out), and fused with the embedding term: the product before the patch term.
- featrec: feature-space reconstruction error alone: the graph's feature term (cosine distance of the
  encoder features of the frame and of its rebuild), z-scored per pixel with the bundle's statistics.
- padim: a Gaussian per patch position (Ledoit-Wolf shrunk) on the patch embeddings.
- gauss: one Gaussian shared by every position.
- knn: distance to the nearest good patch in a memory bank (greedy k-centre coreset, PatchCore-style).
- patch term: the scoring graph's own patch term (models/patches.py, fitted by train/patches.py on every
  training image, a seeded subset of PATCH_DIMS channels), as a bundle trained now holds it.
- map+X wK: X's sharp patch distance as one more term of the product's map, z-scored per pixel on the scale
  images and weighted K against the rebuild terms' weights (3 by default), then the product's top-k
  image score: how the graph ships the patch term.

Patch embeddings: the U-Net encoder outputs (`UNet.features`: the levels at 1/2, 1/4 and 1/8 of the
input), each averaged over 3 x 3 neighbours and resized to the 1/4 grid, concatenated; computed at
t = 0 (clean frame) or at a small t with the graph's fixed noise (--t). They are fitted on the bundle's
training images, minus --scale-images of them that give the robust scale (median / IQR) the best-rank
rule's tie-break reads. A patch map is upsampled to the input grid and blurred like the product's map;
its image score is the map's maximum. Each patch scorer is measured alone, fused with the embedding term
(`+emb`), and with the diffusion score as well (`+diff+emb`), all by the best-rank rule
(threshold.min_rank_p). Thresholds come from the calibration images (the bundle's holdout) at --rate
(1 %, or 2.5 % where the holdout is too small), as `inspect calibrate` sets them.

Columns: image AUROC, misses and false rejects at the threshold on the test set, pixel AUROC, AUPRO
(on the arm's map), and where training holds near-twins of the good test photos (magnetic_tile), image
AUROC without those photos (bench/accuracy.py's twin rule; misses do not change). The JSON (--out) adds
misses per defect type.

    inspect train ../shared/datasets/magnetic_tile --out /tmp/pf/magnetic_tile --steps 800
    inspect calibrate /tmp/pf/magnetic_tile
    python bench/patch_features.py /tmp/pf/magnetic_tile:../shared/datasets/magnetic_tile \
        /tmp/pf/ball_screw:../shared/datasets/ball_screw --out /tmp/pf/patch_features.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accuracy import twins

from diffinspect.bundle import Bundle
from diffinspect.data.datasets import labelled_set
from diffinspect.data.image import read_image
from diffinspect.engines.torch_engine import TorchEngine
from diffinspect.evaluation import metrics
from diffinspect.evaluation.evaluate import mask_on_map
from diffinspect.models.patches import PatchGaussian
from diffinspect.models.scoring import ScoringGraph
from diffinspect.scoring.calibrate import image_sets
from diffinspect.scoring.diffusion import DiffusionDetector, Stats, fit_frames, robust_scale, robust_z
from diffinspect.scoring.gaussian import GaussianEmbedding, ledoit_wolf
from diffinspect.scoring.loader import load_detector
from diffinspect.scoring.threshold import (
    conformal_threshold,
    min_calibration_size,
    min_rank_p,
    min_rank_threshold,
    tie_break_room,
)
from diffinspect.train.patches import fit_patch_statistics

COLUMNS = ("image_auroc", "miss", "false_reject", "pixel_auroc", "aupro", "twin_free_auroc")


# --- patch embeddings -------------------------------------------------------------------------------

def patch_embeddings(denoiser: torch.nn.Module, inputs: np.ndarray, t: int, ab: float, noise: torch.Tensor,
                     batch: int = 32) -> np.ndarray:
    """(N, H, W, C) uint8 model inputs -> (N, h, w, D) float32 patch embeddings on the 1/4 grid."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            x = torch.from_numpy(inputs[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            if t > 0:
                x = math.sqrt(ab) * x + math.sqrt(1 - ab) * noise.expand_as(x)
            feats = denoiser.features(x, torch.full((x.shape[0],), float(t)))
            grid = feats[1].shape[-2:]
            parts = [F.interpolate(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), size=grid, mode="bilinear",
                                   align_corners=False) for f in feats]
            out.append(torch.cat(parts, 1).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out).astype(np.float32)


# --- patch scorers: fit on good embeddings (N, h, w, D), score -> (N, h, w) ---------------------------

class PerPosition:
    """A Gaussian per patch position (PaDiM), covariance shrunk by Ledoit-Wolf."""

    def __init__(self, emb: np.ndarray) -> None:
        n, h, w, d = emb.shape
        x = emb.reshape(n, h * w, d).astype(np.float64)
        self.mean = x.mean(0)
        self.whiten = np.empty((h * w, d, d), np.float32)
        for p in range(h * w):
            cov, _ = ledoit_wolf(x[:, p] - self.mean[p])
            values, vectors = np.linalg.eigh(cov)
            self.whiten[p] = vectors / np.sqrt(np.maximum(values, 1e-12))

    def score(self, emb: np.ndarray) -> np.ndarray:
        n, h, w, d = emb.shape
        z = (emb.reshape(n, h * w, d) - self.mean).astype(np.float32)
        return np.sqrt((np.einsum("npd,pde->npe", z, self.whiten) ** 2).sum(-1)).reshape(n, h, w)


class Shared:
    """One Gaussian for every position (scoring/gaussian.py on the patches)."""

    def __init__(self, emb: np.ndarray) -> None:
        self.g = GaussianEmbedding(emb.reshape(-1, emb.shape[-1]))

    def score(self, emb: np.ndarray) -> np.ndarray:
        return np.sqrt(self.g.score(emb.reshape(-1, emb.shape[-1]))).reshape(emb.shape[:3])


class Memory:
    """Distance to the nearest good patch (standardized per channel) in a greedy k-centre coreset of
    `bank` patches, picked in a random projection from a random sample of the good patches (PatchCore)."""

    def __init__(self, emb: np.ndarray, bank: int = 4096, pool: int = 65536, seed: int = 0) -> None:
        x = emb.reshape(-1, emb.shape[-1])
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        rng = np.random.default_rng(seed)
        x = torch.from_numpy((x[rng.choice(len(x), min(pool, len(x)), replace=False)] - self.mean) / self.std)
        proj = x @ torch.from_numpy(rng.standard_normal((x.shape[1], 64)).astype(np.float32) / 8)
        chosen = [0]
        dist = ((proj - proj[0]) ** 2).sum(1)
        for _ in range(min(bank, len(x)) - 1):
            i = int(dist.argmax())
            chosen.append(i)
            dist = torch.minimum(dist, ((proj - proj[i]) ** 2).sum(1))
        self.bank = x[chosen]
        self.bank_sq = (self.bank**2).sum(1)

    def score(self, emb: np.ndarray, batch: int = 8192) -> np.ndarray:
        q = torch.from_numpy((emb.reshape(-1, emb.shape[-1]) - self.mean) / self.std)
        out = []
        for i in range(0, len(q), batch):
            b = q[i:i + batch]
            d2 = (b**2).sum(1, keepdim=True) - 2 * b @ self.bank.T + self.bank_sq
            out.append(d2.min(1).values.clamp_min(0).sqrt())
        return torch.cat(out).numpy().reshape(emb.shape[:3])


SCORERS: dict[str, Callable[[np.ndarray], object]] = {"padim": PerPosition, "gauss": Shared, "knn": Memory}


@torch.no_grad()
def shipped_map(denoiser: torch.nn.Module, patches: PatchGaussian, inputs: np.ndarray, batch: int = 32) -> np.ndarray:
    """The scoring graph's patch distance (before upsampling) of model inputs: (N, h, w)."""
    out = []
    for i in range(0, len(inputs), batch):
        x = ScoringGraph.to_input(torch.from_numpy(inputs[i:i + batch]))
        out.append(patches(denoiser.features(x, torch.zeros(len(x)))))
    return torch.cat(out).numpy()


# --- maps, scores, fusion ---------------------------------------------------------------------------

def to_input_grid(patch_maps: np.ndarray, hw: tuple[int, int], kernel: torch.Tensor | None) -> np.ndarray:
    """Patch maps (N, h, w) -> maps on the input grid (N, H, W), blurred as the graph blurs its map."""
    from diffinspect.models.scoring import separable_blur

    m = F.interpolate(torch.from_numpy(patch_maps)[:, None].float(), size=hw, mode="bilinear", align_corners=False)
    return (m if kernel is None else separable_blur(m, kernel))[:, 0].numpy()


def best_rank(cal: list[np.ndarray], test: list[np.ndarray], scales: list[tuple[float, float]]) -> np.ndarray:
    """Fused score of K detectors by the full-conformal best-rank rule, as FrameTerm.fuse does for two."""
    cal_sum = sum(robust_z(c, s) for c, s in zip(cal, scales, strict=True))
    test_sum = sum(robust_z(t, s) for t, s in zip(test, scales, strict=True))
    p = min_rank_p(np.stack(cal), np.stack(test), cal_sum, test_sum)
    return -np.log(p) + tie_break_room(len(cal[0])) * (0.5 + np.arctan(test_sum) / np.pi)


def figures(labels: np.ndarray, scores: np.ndarray, reject: np.ndarray, twin: np.ndarray | None,
            defects: np.ndarray) -> dict:
    out = {"image_auroc": metrics.image_auroc(labels, scores), "miss": float(np.mean(~reject[labels])),
           "false_reject": float(np.mean(reject[~labels])),
           "miss_per_defect": {d: float(np.mean(~reject[defects == d])) for d in sorted(set(defects[labels]))}}
    if twin is not None:
        keep = ~twin
        out["twin_free_auroc"] = metrics.image_auroc(labels[keep], scores[keep])  # misses do not change
    return out


def pixel_figures(maps: np.ndarray, pairs_of: Callable[[np.ndarray], list]) -> dict:
    pairs = [p for p in pairs_of(maps) if p is not None]
    maps_, masks_ = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"pixel_auroc": metrics.pixel_auroc(maps_, masks_), "aupro": metrics.aupro(maps_, masks_)}


# --- one bundle ---------------------------------------------------------------------------------------

def training_paths(bundle: Bundle) -> list[Path]:
    return bundle.manifest.training.paths_on_disk() if bundle.manifest.training else []


def measure(bundle_path: Path, category: Path, ts: list[int], scale_images: int, rate: float | None,
            twin_corr: float, log: Callable[[str], None]) -> dict:
    b = Bundle.load(bundle_path)
    shipped = det = load_detector(b, backend="torch")
    term, prep = det.frame_term, det.preprocess
    assert term is not None and term.rule == "minp", "calibrate the bundle with the default (minp) frame term"
    if "patch" in det.engine.term_names:
        # A bundle trained with the patch term: every arm but `bundle` starts from the rebuild terms alone.
        keep = [i for i, name in enumerate(det.engine.term_names) if name != "patch"]
        rebuild = TorchEngine(b, "cpu", recipe=replace(b.recipe, patch_weight=0.0))
        det = DiffusionDetector(rebuild, prep, Stats(det.stats.mean[keep], det.stats.std[keep]), det.threshold, None)
    graph = det.engine.graph  # type: ignore[attr-defined]
    denoiser, hw = graph.denoiser, tuple(graph.noise.shape[-2:])
    schedule = b.schedule

    _, cal_paths, _ = image_sets(b, None)
    fit_paths = training_paths(b)
    rng = np.random.default_rng(0)
    scale_idx = set(rng.choice(len(fit_paths), scale_images, replace=False).tolist())
    scale_paths = [p for i, p in enumerate(fit_paths) if i in scale_idx]
    fit_paths = [p for i, p in enumerate(fit_paths) if i not in scale_idx]
    test = labelled_set(category)
    labels = np.array([s.is_anomalous for s in test.samples])
    defects = np.array([s.defect for s in test.samples])
    n_cal = len(cal_paths)
    rate = rate or (0.01 if n_cal >= min_calibration_size(0.01) else 0.025)
    twin = twins(category, bundle_path, twin_corr)
    log(f"{category.name}: fit {len(fit_paths)}, scale {len(scale_paths)}, calibration {n_cal}, "
        f"test {len(labels)} ({labels.sum()} defective), rate {rate:g}, input {hw}")

    def read(paths: list[Path]) -> list[np.ndarray]:
        return [read_image(p, prep.color) for p in paths]

    frames = {"fit": read(fit_paths), "scale": read(scale_paths), "cal": read(cal_paths),
              "test": read([s.path for s in test.samples])}
    inputs = {k: fit_frames(v, prep) for k, v in frames.items()}

    # The product as it ships, and its parts: diffusion maps, scores (no frame term) and raw terms.
    t0 = time.perf_counter()
    diff = {k: det.run_fitted(inputs[k]) for k in ("scale", "cal", "test")}
    emb = {k: term.embedding_scores(frames[k]) for k in ("scale", "cal", "test")}
    log(f"  diffusion and embedding scores: {time.perf_counter() - t0:.0f} s")
    masks = [None if s.mask is None else read_image(s.mask, "gray")[..., 0] > 127 for s in test.samples]

    def pairs_of(maps: np.ndarray) -> list:
        out = []
        for s, amap, mask, fr in zip(test.samples, maps, masks, frames["test"], strict=True):
            if s.is_anomalous and mask is None:
                out.append(None)
            else:
                out.append(mask_on_map(mask if mask is not None else np.zeros(fr.shape[:2], bool), amap, prep))
        return out

    n = n_cal
    threshold = min_rank_threshold(n, rate)
    rows: dict[str, dict] = {}

    def add(name: str, scores: dict[str, np.ndarray], maps: np.ndarray, pixel: dict,
            fusions: tuple[str, ...] = ("+emb", "+diff+emb")) -> None:
        """An arm from one detector's (scale, cal, test) scores: alone, and fused by the best-rank rule with
        the embedding term (+emb) and with the diffusion score too (+diff+emb)."""
        alone = scores["test"] > conformal_threshold(scores["cal"], rate)
        rows[name] = {**figures(labels, scores["test"], alone, twin, defects), **pixel}
        parts = {"+emb": [scores, emb], "+diff+emb": [scores, {k: v[1] for k, v in diff.items()}, emb]}
        for suffix, ds in ((f, parts[f]) for f in fusions):
            fused = best_rank([d["cal"] for d in ds], [d["test"] for d in ds], [robust_scale(d["scale"]) for d in ds])
            rows[name + suffix] = {**figures(labels, fused, fused > threshold, twin, defects), **pixel}
        log(f"  {name}: " + " ".join(f"{k} {rows[name + '+emb'][k]:.3f}" for k in ("image_auroc", "miss"))
            + f" pixel {pixel['pixel_auroc']:.3f} aupro {pixel['aupro']:.3f}")

    def in_map(name: str, sharp: dict[str, np.ndarray]) -> None:
        """The patch distance as one more term of the product's map: z-scored per pixel (statistics from the
        scale images: held out of padim's fit, inside the shipped term's fit as the product's reference
        images are), weighted into the sharp map, top-k image score."""
        stats = Stats.fit(sharp["scale"][:, None])
        w = sum(graph.weights.values())
        for wp in (1.0, w):
            merged = {}
            for s in ("scale", "cal", "test"):
                zd = graph.combine(torch.from_numpy(diff[s][2]), torch.from_numpy(det.stats.mean),
                                   torch.from_numpy(det.stats.std))
                zp = torch.from_numpy((sharp[s][:, None] - stats.mean) / stats.std)[:, 0]
                merged[s] = (w * zd + wp * zp) / (w + wp)
            maps = graph.smooth(merged["test"]).numpy()
            add(f"map+{name} w{wp:g}", {s: graph.image_score(m).numpy() for s, m in merged.items()}, maps,
                pixel_figures(maps, pairs_of))

    diff_pixel = pixel_figures(diff["test"][0], pairs_of)
    maps, scores = (diff["test"][0], diff["test"][1]) if shipped is det else shipped.run_fitted(inputs["test"], False)
    fused = term.fuse(scores, emb["test"])
    rows["bundle"] = {**figures(labels, fused, fused > shipped.threshold, twin, defects),
                      **(diff_pixel if shipped is det else pixel_figures(maps, pairs_of))}
    add("diffusion", {k: v[1] for k, v in diff.items()}, diff["test"][0], diff_pixel, ("+emb",))

    # Feature-space reconstruction error: the graph's feature term alone, z-scored per pixel.
    k = graph.term_names.index("feature")
    z = {s: (diff[s][2][:, k] - det.stats.mean[k]) / det.stats.std[k] for s in diff}
    fmaps = {s: graph.smooth(torch.from_numpy(v)).numpy() for s, v in z.items()}
    add("featrec", {s: m.reshape(len(m), -1).max(1) for s, m in fmaps.items()}, fmaps["test"],
        pixel_figures(fmaps["test"], pairs_of))

    for t in ts:
        ab = float(schedule.ab(t)) if t > 0 else 1.0
        t0 = time.perf_counter()
        e = {s: patch_embeddings(denoiser, inputs[s], t, ab, graph.noise[:1]) for s in inputs}
        log(f"  t={t}: patch embeddings {e['test'].shape[1:]} in {time.perf_counter() - t0:.0f} s")
        for name, make in SCORERS.items():
            t0 = time.perf_counter()
            scorer = make(e["fit"])
            maps = {s: to_input_grid(scorer.score(e[s]), hw, graph.blur_kernel) for s in ("scale", "cal", "test")}
            add(f"{name}@t{t}", {s: m.reshape(len(m), -1).max(1) for s, m in maps.items()}, maps["test"],
                pixel_figures(maps["test"], pairs_of))
            if name == "padim":
                sharp = {s: to_input_grid(scorer.score(e[s]), hw, None) for s in ("scale", "cal", "test")}
                in_map(f"{name}@t{t}", sharp)
        if t == 0:
            # The patch term as shipped: fitted on every training image (scale images included, as the
            # product's reference images are training images), PATCH_DIMS channels.
            t0 = time.perf_counter()
            stats = fit_patch_statistics(denoiser, np.concatenate([inputs["fit"], inputs["scale"]]))
            shipped = PatchGaussian.from_arrays(stats)
            sharp = {s: to_input_grid(shipped_map(denoiser, shipped, inputs[s]), hw, None)
                     for s in ("scale", "cal", "test")}
            maps = {s: graph.smooth(torch.from_numpy(m)).numpy() for s, m in sharp.items()}
            add("patch term", {s: m.reshape(len(m), -1).max(1) for s, m in maps.items()}, maps["test"],
                pixel_figures(maps["test"], pairs_of))
            in_map("patch term", sharp)
            log(f"    ({time.perf_counter() - t0:.0f} s)")
            log(f"    ({time.perf_counter() - t0:.0f} s)")
    return {"rate": rate, "n_calibration": n, "arms": rows}


def table(name: str, res: dict) -> str:
    lines = [f"{name} (n_cal {res['n_calibration']}, rate {res['rate']:g})",
             f"  {'arm':22s} " + " ".join(f"{c:>15s}" for c in COLUMNS)]
    for arm, figs in res["arms"].items():
        cells = [f"{figs[c]:15.3f}" if isinstance(figs.get(c), float) else f"{'-':>15s}" for c in COLUMNS]
        lines.append(f"  {arm:22s} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="BUNDLE:CATEGORY (a calibrated bundle)")
    ap.add_argument("--t", default="0,25", help="noise levels of the patch embeddings, comma-separated")
    ap.add_argument("--scale-images", type=int, default=64, help="training images kept out of the fit for scales")
    ap.add_argument("--rate", type=float, default=None, help="false-reject rate (default 1 %%, else 2.5 %%)")
    ap.add_argument("--twins", type=float, default=0.95, help="pixel correlation that makes a twin photo")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {}
    for pair in args.pairs:
        bundle, category = (Path(x) for x in pair.split(":"))
        report[bundle.name] = measure(bundle, category, [int(t) for t in args.t.split(",")], args.scale_images,
                                      args.rate, args.twins, lambda s: print(s, flush=True))
        print(table(bundle.name, report[bundle.name]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    for name, res in report.items():
        print(table(name, res))


if __name__ == "__main__":
    main()
