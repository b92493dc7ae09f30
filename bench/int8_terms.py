"""Which term of the map an INT8 export loses: each term's correlation with torch, per export.

For an exported bundle, every ONNX / OpenVINO export named in its manifest runs the export's own parity
frames (the bundle's calibration images plus a pasted-defect copy of each, export/parity.py) beside the
torch graph; the raw terms (pixel, SSIM, feature and, where the recipe has it, patch) are compared one by
one, then the normalized map and the score as the export's parity check compares them. A term far below
the others is where INT8 rounding is amplified.

    inspect calibrate B GOOD_DIR && inspect export B --format all --precision int8
    python bench/int8_terms.py B [--images 24]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--images", type=int, default=24, help="calibration images (each with a defect copy)")
    args = ap.parse_args()

    import torch

    from diffinspect.bundle import Bundle
    from diffinspect.data.datasets import list_images
    from diffinspect.data.image import read_image
    from diffinspect.engines.select import make_engine
    from diffinspect.export import parity
    from diffinspect.models.from_bundle import load_graph
    from diffinspect.scoring.diffusion import CALIBRATION_FILE, fit_frames

    bundle = Bundle.load(args.bundle)
    cal = bundle.manifest.calibration
    if cal is None or not bundle.manifest.exports:
        raise SystemExit(f"{args.bundle}: calibrate and export the bundle first")
    prep = bundle.manifest.preprocess
    paths = list_images(cal.folder) if cal.folder else bundle.manifest.training.paths_on_disk(held_out=True)
    frames = fit_frames([read_image(p, prep.color) for p in paths[:args.images]], prep)
    check = parity.parity_frames(frames)
    with np.load(bundle.file(CALIBRATION_FILE)) as z:
        mean, std = z["mean"].astype(np.float32), z["std"].astype(np.float32)
    graph = load_graph(bundle).eval()
    with torch.no_grad():
        ref = [o.numpy() for o in graph(torch.from_numpy(check), torch.from_numpy(mean), torch.from_numpy(std))]
    names = graph.term_names
    print(f"{len(check)} frames ({len(frames)} good + their defect copies); terms {', '.join(names)}")
    print(f"{'export':28s} {'scope':8s} " + " ".join(f"{n:>8s}" for n in names) + f" {'map':>8s} {'score ρ':>8s}")
    for name, rec in bundle.manifest.exports.items():
        engine = make_engine(bundle, rec.format.value.replace("onnx", "onnxruntime"), "cpu",
                             precision=rec.precision.value)
        got = [np.concatenate(part) for part in zip(*(engine.run(check[i:i + 16], mean, std)
                                                      for i in range(0, len(check), 16)), strict=True)]
        terms = [np.corrcoef(ref[2][:, k].ravel(), got[2][:, k].ravel())[0, 1] for k in range(len(names))]
        figures = parity.compare(tuple(ref), tuple(got), len(frames))
        print(f"{name:28s} {str(rec.int8_scope or '-'):8s} " + " ".join(f"{t:8.4f}" for t in terms)
              + f" {figures['map_correlation']:8.4f} {figures['score_rank_correlation']:8.4f}")


if __name__ == "__main__":
    main()
