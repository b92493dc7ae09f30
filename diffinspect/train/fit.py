"""Fitting a denoiser on good images: AdamW, EMA weights, checkpoints, resume, time budget, DDP."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffinspect import DiffinspectError
from diffinspect.config import Config
from diffinspect.engines.exports import available_cores
from diffinspect.logs import Progress
from diffinspect.models import build_model, check_image_size, describe
from diffinspect.models.device import resolve_device
from diffinspect.models.schedule import NoiseSchedule, q_sample
from diffinspect.train.augment import augment_batch
from diffinspect.train.data import TrainingSet
from diffinspect.train.loop import UNBOUNDED, Checkpoint, Clock, Snapshots, budget

# The recipe we stand behind when the user gives neither --steps nor --max-minutes.
DEFAULT_STEPS = 20000
DEFAULT_MAX_MINUTES = 15.0


@dataclass
class TrainResult:
    model: torch.nn.Module  # the EMA weights, used for scoring
    steps: int
    seconds: float
    final_loss: float
    steps_per_second: float
    interrupted: bool = False


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def train_threads(processes: int = 1) -> int:
    """Intra-op threads for one of `processes` training processes sharing this machine's cores.

    The cores are those this process may run on (os.sched_getaffinity: a container's or taskset's
    share, not the host's count, which torch's default reads), split between the processes started
    together (torchrun's LOCAL_WORLD_SIZE). Two processes that each take every core slow each other
    down far more than sharing would (bench/threads.py measures it): their threads spin-wait at every
    barrier for a thread the other process has pushed off its core. DIFFINSPECT_THREADS, when set, wins.
    """
    value = os.environ.get("DIFFINSPECT_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, available_cores() // max(1, processes))


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def fit(
    data: TrainingSet,
    cfg: Config,
    out: Path,
    resume: bool = False,
    progress: Progress | None = None,
    on_step: Callable[[int], None] | None = None,
    init: dict[str, torch.Tensor] | None = None,
    snapshot_minutes: Sequence[float] = (),
    on_snapshot: Callable[[float, TrainResult], None] | None = None,
) -> TrainResult:
    """Train on data.images (frames, or random tiles of canvases); checkpoints go to `<out>.checkpoint/`.
    Progress: task "training", in steps, with loss and seconds (the training clock, resumed runs included).
    `init`: start from these weights (a fine-tune), not at random. `on_snapshot(minutes, result)` gets the
    EMA weights after each of `snapshot_minutes` CPU minutes of this run (loop.Snapshots); without --steps
    or --max-minutes the last snapshot ends the training."""
    tc, mc = cfg.train, cfg.model
    size, channels = data.preprocess.image_size, data.preprocess.color == "rgb" and 3 or 1
    check_image_size(mc.kind, mc.size, size)
    device = resolve_device(tc.device)
    rank, world = _distributed()
    if device.type == "cpu":
        torch.set_num_threads(train_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(tc.seed)
    model = build_model(mc.kind, mc.size, size, channels)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = NoiseSchedule(mc.schedule)
    ab_all = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)
    total, minutes = budget(tc.steps, tc.max_minutes, DEFAULT_STEPS, DEFAULT_MAX_MINUTES)
    last_snapshot_ends = bool(snapshot_minutes) and tc.steps is None and tc.max_minutes is None
    if last_snapshot_ends:
        total, minutes = UNBOUNDED, None

    ckpt = Checkpoint(checkpoint_dir(out))
    step, elapsed_before = 0, 0.0
    if resume:
        state = ckpt.load(device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before = int(state["step"]), float(state["elapsed"])
    start_step = step
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    hw = data.preprocess.hw
    tiles = data.preprocess.feed == "tiles"
    if tiles:  # canvases of varying size, uint8 C,H,W on CPU; batches are random crops of them
        canvases = [torch.from_numpy(c).permute(2, 0, 1) for c in data.images]
        n_images = len(canvases)
    else:
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8 N,C,H,W on CPU
        n_images = images.shape[0]
    gen = torch.Generator().manual_seed(tc.seed * 1000 + rank)
    # Replay the generator so a resumed run draws the batches an uninterrupted run would have drawn.
    for _ in range(step):
        _draw(gen, n_images, tc.batch_size, tc.t_max, channels, hw, tiles)
    use_amp = device.type == "cuda"
    clock = Clock(minutes, elapsed_before)
    loss_ema = float("nan")

    def save_checkpoint() -> None:
        if rank == 0:
            ckpt.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                       "step": step, "elapsed": clock.elapsed()})

    snaps = None
    if snapshot_minutes and on_snapshot is not None:
        if world > 1:  # the ranks would each keep their own CPU clock and stop at different steps
            raise DiffinspectError("snapshots by CPU minutes need a single training process, not torchrun")

        def write(at: float, step: int) -> None:
            rate = (step - start_step) / max(clock.session(), 1e-9)
            on_snapshot(at, TrainResult(copy.deepcopy(ema).cpu().eval(), step, clock.elapsed(), loss_ema, rate))

        snaps = Snapshots(list(snapshot_minutes), write)
        snaps.tick(step)
    with ckpt.on_interrupt("training", "step", lambda: step, save_checkpoint):
        while step < total and not _out_of_time(clock.over(), world, device):
            idx, t, noise, corners = _draw(gen, n_images, tc.batch_size, tc.t_max, channels, hw, tiles)
            batch = _crops(canvases, idx, corners, hw) if tiles else images[idx]
            x0 = batch.float().div_(127.5).sub_(1.0)
            x0 = augment_batch(x0, tc.augment, gen)
            x0, t, noise = x0.to(device), t.to(device), noise.to(device)
            xt = q_sample(x0, noise, ab_all[t].view(-1, 1, 1, 1))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = train_model(xt, t.float())
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            _ema_update(ema, model, tc.ema_decay if step > 100 else 0.0)
            step += 1
            value = float(loss.detach())
            loss_ema = value if np.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * value
            if progress is not None and rank == 0:
                progress("training", step, None if total == UNBOUNDED else total, loss=loss_ema,
                         seconds=clock.elapsed())
            if step % tc.checkpoint_every == 0:
                save_checkpoint()
            if on_step is not None:
                on_step(step)
            if snaps is not None:
                snaps.tick(step)
                if snaps.done and last_snapshot_ends:
                    break
    seconds = clock.elapsed()
    if world > 1:
        torch.distributed.barrier()
    rate = (step - start_step) / max(clock.session(), 1e-9)
    return TrainResult(ema.cpu().eval(), step, seconds, loss_ema, rate)


def _out_of_time(mine: bool, world: int, device: torch.device) -> bool:
    """Under DDP every rank must run the same number of steps (each step all-reduces gradients), so a
    time budget stops all ranks when the first one runs out."""
    if world == 1:
        return mine
    flag = torch.tensor([1.0 if mine else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _draw(gen: torch.Generator, n: int, batch: int, t_max: int, channels: int, hw: tuple[int, int],
          tiles: bool = False):
    """Image indices, noise levels, noise and (tiles only) crop corners; every random draw of a step
    except augmentation, so a resume can replay them."""
    idx = torch.randint(0, n, (batch,), generator=gen)
    t = torch.randint(0, t_max, (batch,), generator=gen)
    noise = torch.randn(batch, channels, *hw, generator=gen)
    # Corners as fractions of each canvas's free range: the same draws fit canvases of any size, and
    # frame mode draws exactly what it always drew.
    corners = torch.rand(batch, 2, generator=gen) if tiles else None
    return idx, t, noise, corners


def _crops(canvases: list[torch.Tensor], idx: torch.Tensor, corners: torch.Tensor,
           hw: tuple[int, int]) -> torch.Tensor:
    """An (h, w) crop of canvas idx[i] at fractional corner corners[i] (y, x): (N, C, h, w)."""
    (th, tw), out = hw, []
    for i, (fy, fx) in zip(idx.tolist(), corners.tolist(), strict=True):
        c = canvases[i]
        y, x = int(fy * (c.shape[1] - th + 1)), int(fx * (c.shape[2] - tw + 1))
        out.append(c[:, y:y + th, x:x + tw])
    return torch.stack(out)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def clear_checkpoints(out: Path) -> None:
    Checkpoint(checkpoint_dir(out)).clear()


def model_summary(model: torch.nn.Module, image_size: int | tuple[int, int], channels: int) -> dict:
    return describe(model, image_size, channels)
