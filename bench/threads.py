"""Two torch processes on the same cores: why they slow each other down, and what the thread choice buys.

Each worker trains the U-Net small at 64 px (batch 16, forward + backward + AdamW) for --seconds and
reports steps/s. Scenarios, run one after another:

  alone          one worker, torch's default threads (one per core)
  alone, passive the same with OMP_WAIT_POLICY=PASSIVE (what the CLI sets when the cores are already busy)
  two, default   two workers at once, each with torch's default threads: 2x oversubscribed
  two, shared    two workers at once, each with `train_threads(2)` (the cores it may use, split between
                 the processes that share them, as `inspect train` does under torchrun)
  two, passive   as "two, default" with OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning)

It prints each worker's steps/s and the ratio of the two-process total to the single process. About
(5 x --seconds + start-up) of wall time: 95 s at the default.

    python bench/threads.py [--seconds 15]

What to look for: on cores other jobs already use, "two, default" (threads spinning at every barrier for
a thread the other process pushed off its core) falls far below "two, shared" and "two, passive"; on
quiet cores spinning is the faster choice for a process alone. The figures depend on the machine and its
load: they are this bench's output, not constants.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, os, sys, time
import torch
from diffinspect.models import build_model
from diffinspect.train.fit import train_threads
if os.environ.get("BENCH_SHARED"):
    torch.set_num_threads(train_threads(int(os.environ["BENCH_SHARED"])))
model = build_model("unet", "small", 64, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, t = torch.randn(16, 1, 64, 64), torch.randint(0, 1000, (16,)).float()
seconds, steps = float(sys.argv[1]), 0
start = float(sys.argv[2])
while time.time() < start:  # both workers start their clocks together
    time.sleep(0.01)
t0 = time.perf_counter()
while time.perf_counter() - t0 < seconds:
    loss = (model(x, t) - x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); steps += 1
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))
"""


def run(n: int, seconds: float, env_extra: dict[str, str]) -> list[dict]:
    env = {**os.environ, **env_extra}
    start = time.time() + 8  # after torch's import in both
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(seconds), str(start)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    alone = run(1, args.seconds, {})
    base = alone[0]["steps_per_s"]
    print(f"alone          {base:.2f} steps/s ({alone[0]['threads']} threads)")
    passive = run(1, args.seconds, {"OMP_WAIT_POLICY": "PASSIVE"})[0]["steps_per_s"]
    print(f"alone, passive {passive:.2f} steps/s: passive / spinning = {passive / base:.2f}")
    for name, env in (("two, default", {}), ("two, shared", {"BENCH_SHARED": "2"}),
                      ("two, passive", {"OMP_WAIT_POLICY": "PASSIVE"})):
        r = run(2, args.seconds, env)
        total = sum(w["steps_per_s"] for w in r)
        each = " + ".join(f"{w['steps_per_s']:.2f}" for w in r)
        print(f"{name:14s} {each} steps/s ({r[0]['threads']} threads each): total / alone = {total / base:.2f}")


if __name__ == "__main__":
    main()
