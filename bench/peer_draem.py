"""DRAEM from anomalib, trained for a fixed number of CPU minutes; run by bench/peers.py in its own venv.

anomalib's own Lightning module downloads the DTD texture set when it is missing, so this drives its
torch parts directly: `DraemModel` (reconstructive + discriminative networks, no pretrained weights),
`DraemLoss`, and `PerlinAnomalyGenerator` with no anomaly source, which blends Perlin-shaped noise
instead of textures. Optimizer as anomalib configures it (Adam, lr 1e-4). Frames are resized to a
square (anomalib's default pre-processing, 256 px unless --size says otherwise).

    python bench/peer_draem.py --train LIST --score LIST --minutes 15 --out scores.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.models.image.draem.loss import DraemLoss
from anomalib.models.image.draem.torch_model import DraemModel


def load(paths: list[str], size: int) -> torch.Tensor:
    out = np.empty((len(paths), 3, size, size), np.float32)
    for i, p in enumerate(paths):
        img = cv2.imread(p, cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot read {p}")
        img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
        out[i] = img.transpose(2, 0, 1) / 255.0
    return torch.from_numpy(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="file with one training image path a line")
    ap.add_argument("--score", type=Path, required=True, help="file with one image path a line to score")
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train = load(args.train.read_text().splitlines(), args.size)
    model, loss_fn = DraemModel(), DraemLoss()
    augment = PerlinAnomalyGenerator(anomaly_source_path=None, blend_factor=(0.1, 1.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    start, steps = time.monotonic(), 0
    gen = torch.Generator().manual_seed(args.seed)
    while time.monotonic() - start < 60 * args.minutes:
        batch = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
        augmented, mask = augment(batch)
        reconstruction, prediction = model(augmented)
        loss = loss_fn(batch, reconstruction, mask, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps}, {time.monotonic() - start:.0f} s, loss {loss.item():.4f}", flush=True)
    trained_s = time.monotonic() - start
    model.eval()
    paths = args.score.read_text().splitlines()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            out = model(load(paths[i:i + 16], args.size))
            scores.append(out.pred_score.numpy())
            maps.append(out.anomaly_map.numpy().astype(np.float16))
    np.savez_compressed(args.out, scores=np.concatenate(scores), maps=np.concatenate(maps),
                        steps=steps, trained_s=trained_s)
    print(f"DRAEM: {steps} steps in {trained_s / 60:.1f} min; scored {len(paths)} images", flush=True)


if __name__ == "__main__":
    main()
