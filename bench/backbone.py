"""What a backbone (`inspect train --backbone FILE`) costs in model time: the exported scoring graph's
milliseconds per frame without the patch term, with it on the denoiser's own features, and with it on a
ResNet's layer2 + layer3 (randomly initialised: cost does not depend on the weights; accuracy does, and
is not measured here, having no pretrained weights and downloading none).

Each graph is the default U-Net (small) scoring step at the model input, exported to ONNX as
`inspect export` does and run by the onnxruntime engine (FP32, the backbone stays float in INT8 exports
too), on batches of synthetic frames; the figure is the median over repeats, per frame.

    python bench/backbone.py [--size 64] [--input 224] [--batch 8] [--repeats 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="model input side")
    ap.add_argument("--input", type=int, default=224, help="backbone input side (the default at 64 px)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--backbones", default="resnet18,wide_resnet50_2")
    args = ap.parse_args()

    import torch

    from diffinspect.data.synthetic import render_frame
    from diffinspect.engines.onnx_engine import OnnxEngine
    from diffinspect.export.onnx_graph import export_onnx
    from diffinspect.export.rewrite import for_export
    from diffinspect.models import build_model
    from diffinspect.models.backbone import BackboneFeatures, ResNetTrunk
    from diffinspect.models.patches import BACKBONE_GRID, PatchGaussian
    from diffinspect.models.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe
    from diffinspect.models.schedule import NoiseSchedule
    from diffinspect.models.scoring import ScoringGraph
    from diffinspect.train.patches import fit_patch_statistics

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = np.stack([render_frame("metal", rng, args.size, None)[0] for _ in range(32)])
    denoiser = build_model("unet", "small", args.size, 3).eval()
    schedule = NoiseSchedule("linear")
    arms: dict[str, ScoringGraph] = {
        "no patch term": ScoringGraph(denoiser, schedule, Recipe()),
        "patch term, denoiser features": ScoringGraph(
            denoiser, schedule, Recipe(patch_weight=1.0),
            patches=PatchGaussian.from_arrays(fit_patch_statistics(denoiser, frames))),
    }
    for kind in args.backbones.split(","):
        backbone = BackboneFeatures(ResNetTrunk(kind), (args.input, args.input), IMAGENET_MEAN, IMAGENET_STD)
        stats = fit_patch_statistics(denoiser, frames, backbone=backbone)
        arms[f"patch term, {kind} at {args.input} px"] = ScoringGraph(
            denoiser, schedule, Recipe(patch_weight=1.0), patches=PatchGaussian.from_arrays(stats, BACKBONE_GRID),
            backbone=backbone)

    batch = frames[:args.batch]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, graph in arms.items():
            k = len(graph.term_names)
            mean = np.zeros((k, args.size, args.size), np.float32)
            std = np.ones((k, args.size, args.size), np.float32)
            path = Path(tmp) / "graph.onnx"
            export_onnx(for_export(graph), (torch.from_numpy(frames[:2]), torch.from_numpy(mean),
                                            torch.from_numpy(std)), path)
            engine = OnnxEngine(path, graph.term_names, "cpu", "fp32")
            for _ in range(3):
                engine.run(batch, mean, std)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine.run(batch, mean, std)
                times.append((time.perf_counter() - t0) / len(batch) * 1000)
            rows.append((name, float(np.median(times))))
            print(f"{name:40s} {rows[-1][1]:8.2f} ms/frame", flush=True)
    base = rows[0][1]
    print(f"\n| graph (ONNX FP32, onnxruntime, batch {args.batch}, {args.size} px model input) | ms per frame | "
          f"x without the patch term |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
