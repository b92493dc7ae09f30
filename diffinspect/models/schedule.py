"""Noise schedule and DDIM step: pure math, shared by training, the scoring graph and the tests.

Nothing here imports torch. The conversions below use only `+ - * / **`, so the same function works
on numpy arrays, torch tensors and Python floats alike; `ab` is ᾱ_t, already broadcastable against
the images (a float, or e.g. an (N, 1, 1, 1) array/tensor).

Conventions: timesteps are 0..T-1 with ᾱ_t decreasing; x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε. A DDIM
step whose target ᾱ is 1 lands exactly on the predicted x0, which is how a sampler's last step ends.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np

from diffinspect import DiffinspectError
from diffinspect.vocab import ScheduleKind

# Anything that supports arithmetic with floats: np.ndarray, torch.Tensor, float.
A = TypeVar("A")


class NoiseSchedule:
    """ᾱ_t for t = 0..timesteps-1, as float64 (float32 cumprod drifts visibly near t = T)."""

    def __init__(self, kind: str = "linear", timesteps: int = 1000) -> None:
        if kind not in ScheduleKind.values():
            raise DiffinspectError(
                f"unknown noise schedule {kind!r}: choose one of {ScheduleKind.listed()}"
            )
        if int(timesteps) < 2:
            raise DiffinspectError(f"noise schedule needs at least 2 timesteps, got {timesteps}")
        self.kind = kind
        self.timesteps = int(timesteps)
        self.alphas_cumprod = _cosine(self.timesteps) if kind == "cosine" else _linear(self.timesteps)

    def ab(self, t: Any) -> Any:
        """ᾱ at integer timestep(s) t: a float for an int, an array for an array, a tensor for a tensor.

        Float t are truncated, as the models are trained on integer timesteps.
        """
        if type(t).__module__.startswith("torch"):
            import torch  # lazy: the edge runtime has no torch

            table = torch.as_tensor(self.alphas_cumprod, device=t.device)
            return table[t.long()]
        if np.ndim(t) == 0:
            return float(self.alphas_cumprod[int(t)])
        return self.alphas_cumprod[np.asarray(t).astype(np.int64)]

    def ddim_alphas(self, t_start: int, steps: int) -> list[tuple[int, float, float]]:
        """(t, ᾱ_t, ᾱ_prev) for each step of a DDIM run from t_start; the last ᾱ_prev is 1 (clean)."""
        ts = ddim_timesteps(t_start, steps)
        if ts[0] >= self.timesteps:
            raise DiffinspectError(f"t* = {t_start} is outside the noise schedule (0..{self.timesteps - 1})")
        abs_ = [self.ab(t) for t in ts]
        return [(t, a, a_prev) for t, a, a_prev in zip(ts, abs_, [*abs_[1:], 1.0], strict=True)]

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps})"


def _linear(timesteps: int) -> np.ndarray:
    # DDPM (Ho et al. 2020): betas linear in [1e-4, 0.02].
    betas = np.linspace(1e-4, 0.02, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def _cosine(timesteps: int, s: float = 0.008) -> np.ndarray:
    # Improved DDPM (Nichol & Dhariwal 2021): ᾱ follows cos², betas clipped so the last steps stay finite.
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    return np.cumprod(1.0 - betas)


def q_sample(x0: A, eps: A, ab: Any) -> A:
    """Noise x0 to level ᾱ: x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε."""
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * eps


def x0_from_eps(xt: A, eps: A, ab: Any) -> A:
    return (xt - (1 - ab) ** 0.5 * eps) / ab**0.5


def ddim_step(xt: A, eps: A, ab_t: Any, ab_prev: Any) -> A:
    """Deterministic DDIM step (η = 0) from ᾱ_t to ᾱ_prev; ab_prev = 1 returns the predicted x0."""
    x0 = x0_from_eps(xt, eps, ab_t)
    return ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """Timesteps at which the denoiser is evaluated, descending and evenly spaced from t_start toward 0.

    The step after the last one lands on the clean image (ᾱ = 1), so steps=1 is [t_start] and
    steps=4 from 400 is [400, 300, 200, 100].
    """
    t_start, steps = int(t_start), int(steps)
    if steps < 1:
        raise DiffinspectError(f"sampler steps must be at least 1, got {steps}")
    if t_start < steps:
        raise DiffinspectError(f"t* = {t_start} is too small for {steps} sampler steps: use t* >= {steps}")
    # Integer round-half-up of t_start·(steps-i)/steps: spacing >= 1, so the timesteps are distinct.
    return [(2 * t_start * (steps - i) + steps) // (2 * steps) for i in range(steps)]
