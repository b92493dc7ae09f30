"""Benchmark of the scoring backends, side by side in one run: frames/s of the whole scoring step at
batch 1 and 8 for torch eager FP32, onnxruntime FP32/INT8 and OpenVINO FP32/FP16/INT8, as ratios to
torch eager FP32 measured in the same run; optionally image AUROC per backend on a labelled category.

Targets: OpenVINO INT8 >= 2.5x torch eager FP32 at 128 px on CPU; AUROC drop <= 0.005 vs torch FP32.

    python bench/backends.py --sizes 64,128 --threads 1          # throwaway small U-Nets, synthetic line
    python bench/backends.py --bundle model/ --category data/magnetic_tile

Each size gets a throwaway bundle (small U-Net trained --train-steps on a synthetic line, calibrated on
its good frames, exported to every format and precision). Engines are timed in interleaved rounds
(every engine once per round) and the median is kept, so load from other jobs on a shared machine
hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
           ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8")]


def build_bundle(root: Path, size: int, steps: int, log) -> Path:
    """Train, calibrate and export a throwaway small U-Net at `size` px on a synthetic line."""
    from diffinspect.config import load_config
    from diffinspect.data.synthetic import make_line
    from diffinspect.export import export_bundle
    from diffinspect.scoring.calibrate import calibrate
    from diffinspect.train import train

    line = make_line(root / f"line{size}", "metal", n_train=24, n_test_good=20, n_test_defect=0, size=size)
    out = root / f"unet{size}"
    cfg = load_config(overrides={"model.size": "small", "data.image_size": size, "train.steps": steps,
                                 "train.batch_size": 4, "data.holdout": 0.25})
    t0 = time.perf_counter()
    train(line, out, cfg)
    calibrate(out, line / "test" / "good", false_reject_rate=0.1)
    export_bundle(out, "all", "all", allow_mismatch=True)
    log(f"{size} px bundle built in {time.perf_counter() - t0:.0f} s")
    return out


def engines(bundle, device: str) -> dict[str, object]:
    from diffinspect.engines.select import make_engine

    out = {}
    for backend, precision in ENGINES:
        try:
            out[f"{backend} {precision}"] = make_engine(bundle, backend, device,
                                                        precision=None if backend == "torch" else precision)
        except Exception as exc:  # a missing export or runtime: report it, measure the rest
            print(f"  skipped {backend} {precision}: {exc}", file=sys.stderr)
    return out


def throughput(engs: dict, stats, size: int | list[int], channels: int, batches: list[int], seconds: float,
               rounds: int) -> dict[tuple[str, int], float]:
    """Median frames/s per (engine, batch) over interleaved rounds."""
    from diffinspect.data.image import input_hw

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (max(batches), *input_hw(size), channels), dtype=np.uint8)
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, eng in engs.items():
            for b in batches:
                x = frames[:b]
                eng.run(x, stats.mean, stats.std)  # warm-up (first-call allocation, lazy compilation)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    eng.run(x, stats.mean, stats.std)
                    n += b
                samples.setdefault((name, b), []).append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in samples.items()}


def auroc(engs: dict, bundle, category: Path) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from diffinspect.data.datasets import labelled_set
    from diffinspect.data.image import read_image
    from diffinspect.scoring.diffusion import DiffusionDetector

    prep = bundle.manifest.preprocess
    test = labelled_set(category)
    frames = [read_image(s.path, prep.color) for s in test.samples]
    labels = [s.is_anomalous for s in test.samples]
    stats = load_stats(bundle)
    out = {}
    for name, eng in engs.items():
        det = DiffusionDetector(eng, prep, stats, 0.0, None)
        scores = np.concatenate([det.score(frames[i:i + 16]).scores for i in range(0, len(frames), 16)])
        out[name] = float(roc_auc_score(labels, scores))
    return out


def load_stats(bundle):
    from diffinspect.scoring.diffusion import CALIBRATION_FILE, Stats

    with np.load(bundle.file(CALIBRATION_FILE)) as z:
        return Stats(z["mean"], z["std"])


def table(size: int, fps: dict, batches: list[int], parity: dict, aurocs: dict | None) -> str:
    head = "| backend | " + " | ".join(f"fps b{b} | ×torch b{b}" for b in batches) + " | parity rank corr |"
    head += " AUROC | ΔAUROC |" if aurocs else ""
    rows = [f"### {size} px", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name in dict.fromkeys(k[0] for k in fps):
        cells = []
        for b in batches:
            f, ref = fps.get((name, b)), fps.get(("torch fp32", b))
            cells += [f"{f:.1f}" if f else "-", f"{f / ref:.2f}" if f and ref else "-"]
        row = f"| {name} | " + " | ".join(cells) + f" | {parity.get(name, '-')} |"
        if aurocs:
            a, a0 = aurocs.get(name), aurocs.get("torch fp32")
            row += f" {a:.4f} | {a - a0:+.4f} |" if a is not None and a0 is not None else " - | - |"
        rows.append(row)
    return "\n".join(rows)


def parity_figures(bundle) -> dict[str, str]:
    out = {"torch fp32": "(reference)"}
    for rec in bundle.manifest.exports.values():
        fmt = "onnxruntime" if rec.format == "onnx" else "openvino"
        out[f"{fmt} {rec.precision}"] = f"{rec.parity['score_rank_correlation']:.4f}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,128,256", help="image sizes for throwaway bundles")
    ap.add_argument("--bundle", type=Path, help="measure this (exported) bundle instead")
    ap.add_argument("--category", type=Path, help="labelled category for AUROC per backend (with --bundle)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window per engine, batch and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every backend [default: all]")
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.category and not args.bundle:
        ap.error("--category needs --bundle (AUROC of a throwaway model means nothing)")
    if args.threads:
        # Every runtime reads its thread count from these before it starts (see engines/exports.py).
        os.environ["OMP_NUM_THREADS"] = os.environ["DIFFINSPECT_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-backends-"))
    os.environ.setdefault("DIFFINSPECT_CACHE_DIR", str(tmp / "cache"))
    try:
        run(args, batches, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, batches: list[int], tmp: Path) -> None:
    from diffinspect.bundle import Bundle
    from diffinspect.data.image import size_record

    paths = [args.bundle] if args.bundle else [
        build_bundle(tmp, int(s), args.train_steps, lambda m: print(m, file=sys.stderr)) for s in args.sizes.split(",")]
    report = {"threads": args.threads, "device": args.device, "seconds": args.seconds, "rounds": args.rounds,
              "cpu": _cpu_name(), "results": []}
    for path in paths:
        bundle = Bundle.load(path)
        size = size_record(bundle.model.image_size)
        engs = engines(bundle, args.device)
        fps = throughput(engs, load_stats(bundle), size, bundle.model.channels, batches,
                         args.seconds, args.rounds)
        aurocs = auroc(engs, bundle, args.category) if args.category else None
        print(table(size, fps, batches, parity_figures(bundle), aurocs) + "\n", flush=True)
        report["results"].append({"size": size, "bundle": str(path), "aurocs": aurocs,
                                  "fps": {f"{k[0]} b{k[1]}": v for k, v in fps.items()}})
    print(f"conditions: {report['cpu']}, threads {args.threads or 'default'}, median of {args.rounds} "
          f"interleaved rounds of {args.seconds:g} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def _cpu_name() -> str:
    try:
        import openvino as ov

        return ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    except Exception:  # informational only
        return "unknown CPU"


if __name__ == "__main__":
    main()
