"""Worker of bench/throughput.py, run in the peer venv of bench/peers.py: anomalib's EfficientAD-S,
PaDiM and PatchCore exported to OpenVINO IR (FP32, and INT8 by anomalib's own post-training
quantization, `CompressionType.INT8_PTQ`) and to ONNX (for the FLOP count) at their default input
sizes. Prints one JSON line: per model, its files, input size and how each export went.

Speed does not depend on the weights' values, so the backbones are randomly initialised
(`pre_trained=False`; EfficientAD's teacher is never distilled) and the fitted statistics are filled
with random numbers of the sizes a real fit gives: PaDiM's Gaussian per position, PatchCore's memory
bank of --train-images images at the default 10 % coreset ratio.

    /work/peer-venv/bin/python bench/peer_export.py --out /tmp/peers --frames frames.npy
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import numpy as np
import torch

SIZE = (256, 256)  # anomalib 2.x's default pre-processor resize of all three models


class Frames:
    """The duck-typed datamodule anomalib's INT8_PTQ path reads: a val_dataloader of {"image": x}."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.train_batch_size = images, 1

    def setup(self, stage: str) -> None:
        pass

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        data = [{"image": x} for x in self.images]
        return torch.utils.data.DataLoader(data, batch_size=self.train_batch_size)


def build(name: str, train_images: int) -> torch.nn.Module:
    from anomalib.models import EfficientAd, Padim, Patchcore

    if name == "efficientad_s":
        return EfficientAd(model_size="small")
    if name == "padim":
        model = Padim(backbone="resnet18", pre_trained=False)
        # The Gaussian per position of the layer1 grid (stride 4): mean (C, P), inverse covariance (P, C, C).
        c, p = model.model.n_features, (SIZE[0] // 4) * (SIZE[1] // 4)
        a = torch.randn(p, c, c) / c
        model.model.gaussian.mean = torch.randn(c, p)
        model.model.gaussian.inv_covariance = a @ a.transpose(1, 2) + torch.eye(c)
        return model
    model = Patchcore(backbone="wide_resnet50_2", pre_trained=False)
    # layer2 + layer3 of wide_resnet50_2: 512 + 1024 channels on the stride-8 grid.
    patches = (SIZE[0] // 8) * (SIZE[1] // 8)
    model.model.memory_bank = torch.randn(int(train_images * patches * 0.1), 1536)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", required=True, help="uint8 (N, 256, 256, 3) .npy: the INT8 calibration frames")
    p.add_argument("--models", default="efficientad_s,padim,patchcore")
    p.add_argument("--train-images", type=int, default=200, help="PatchCore memory bank: images x patches x 0.1")
    a = p.parse_args()
    from anomalib.deploy import CompressionType

    torch.manual_seed(0)
    frames = torch.from_numpy(np.load(a.frames)).permute(0, 3, 1, 2).float() / 255.0
    report = {}
    for name in a.models.split(","):
        root = Path(a.out) / name
        entry: dict = {"input": list(SIZE), "files": {}, "errors": {}}
        try:
            model = build(name, a.train_images).eval()
        except Exception:
            entry["errors"]["build"] = traceback.format_exc(limit=3)
            report[name] = entry
            continue
        for kind, call in (
                ("onnx", lambda m, r: m.to_onnx(r / "onnx", input_size=SIZE)),
                ("fp32", lambda m, r: m.to_openvino(r / "fp32", input_size=SIZE)),
                ("int8", lambda m, r: m.to_openvino(r / "int8", input_size=SIZE,
                                                    compression_type=CompressionType.INT8_PTQ,
                                                    datamodule=Frames(frames)))):
            try:
                entry["files"][kind] = str(call(model, root))
            except Exception as exc:
                entry["errors"][kind] = f"{type(exc).__name__}: {exc}"[:600]
        report[name] = entry
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
