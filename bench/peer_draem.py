"""DRAEM from anomalib, trained for a fixed number of CPU minutes; run by bench/peers.py in its own venv.

A CPU minute is this process's CPU time over torch's threads (as diffinspect's training snapshots count
it, diffinspect.train.loop.cpu_minutes): a wall minute on as many idle cores, whatever else the machine
runs. `--minutes 1,3,5` scores the model after each budget of one training run (scoring not counted).

anomalib's own Lightning module downloads the DTD texture set when it is missing, so this drives its
torch parts directly: `DraemModel` (reconstructive + discriminative networks, no pretrained weights),
`DraemLoss`, and `PerlinAnomalyGenerator` with no anomaly source, which blends Perlin-shaped noise
instead of textures. Optimizer as anomalib configures it (Adam, lr 1e-4). Frames are resized to a
square (anomalib's default pre-processing, 256 px unless --size says otherwise).

    python bench/peer_draem.py --train LIST --score LIST --minutes 15 --out scores.npz

The npz holds, per budget M (as %g), scores_M, maps_M, steps_M; without a list also scores, maps, steps.
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


def cpu_minutes() -> float:
    return time.process_time() / torch.get_num_threads() / 60


def score(model: DraemModel, paths: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 16):
            out = model(load(paths[i:i + 16], size))
            scores.append(out.pred_score.numpy())
            maps.append(out.anomaly_map.numpy().astype(np.float16))
    model.train()
    return np.concatenate(scores), np.concatenate(maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="file with one training image path a line")
    ap.add_argument("--score", type=Path, required=True, help="file with one image path a line to score")
    ap.add_argument("--minutes", required=True, help="CPU minutes of training, or a comma list of them")
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
    budgets = sorted(float(m) for m in args.minutes.split(","))
    paths = args.score.read_text().splitlines()
    gen = torch.Generator().manual_seed(args.seed)
    results: dict[str, np.ndarray] = {}
    start, steps = cpu_minutes(), 0
    while budgets:
        if cpu_minutes() - start >= budgets[0]:
            at, paused = budgets.pop(0), cpu_minutes()
            scores, maps = score(model, paths, args.size)
            results.update({f"scores_{at:g}": scores, f"maps_{at:g}": maps, f"steps_{at:g}": np.array(steps)})
            print(f"DRAEM: {steps} steps in {at:g} CPU min; scored {len(paths)} images", flush=True)
            start += cpu_minutes() - paused  # scoring is not training
            continue
        batch = train[torch.randint(len(train), (args.batch_size,), generator=gen)]
        augmented, mask = augment(batch)
        reconstruction, prediction = model(augmented)
        loss = loss_fn(batch, reconstruction, mask, prediction)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps}, {cpu_minutes() - start:.1f} CPU min, loss {loss.item():.4f}", flush=True)
    if "," not in args.minutes:
        key = f"{float(args.minutes):g}"
        results.update(scores=results[f"scores_{key}"], maps=results[f"maps_{key}"], steps=results[f"steps_{key}"])
    np.savez_compressed(args.out, **results)


if __name__ == "__main__":
    main()
