"""Teacher targets for distillation, kept in a small pool that is refreshed a few entries at a time.

A teacher target costs N denoiser passes (no gradient); a student step costs S passes forward and
backward. On a CPU the teacher would dominate, so each target is reused for about `reuse` student
batches before it is replaced. Entries are (image, noise, teacher x̂0): the noise is a fresh draw, or
(a `fixed_share` of the time) one of the scoring graph's fixed draws, the noise the student meets
at scoring time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffinspect.models.scoring import ScoringGraph


class TargetPool:
    def __init__(
        self,
        images: torch.Tensor,
        teacher: ScoringGraph,
        size: int,
        gen: torch.Generator,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fixed_share: float = 0.25,
    ) -> None:
        self.images = images  # uint8 (N, C, H, W) on the CPU
        self.teacher = teacher
        self.gen = gen
        self.augment = augment
        self.fixed_share = fixed_share
        self.device = teacher.noise.device
        c, s = images.shape[1], images.shape[2]
        self.x = torch.zeros(size, c, s, s, device=self.device)
        self.eps = torch.zeros_like(self.x)
        self.target = torch.zeros_like(self.x)
        self.next = 0  # oldest entry, replaced first; fill with refresh(len(pool)) or load_state_dict

    def __len__(self) -> int:
        return self.x.shape[0]

    @torch.no_grad()
    def refresh(self, n: int) -> None:
        """Replace the n oldest entries with new images, noise and teacher targets."""
        n = min(n, len(self))
        if n < 1:
            return
        idx = torch.randint(0, self.images.shape[0], (n,), generator=self.gen)
        x = self.images[idx].float().div_(127.5).sub_(1.0)
        if self.augment is not None:
            x = self.augment(x)
        eps = torch.randn(x.shape, generator=self.gen)
        fixed = self.teacher.noise.cpu()
        use_fixed = torch.rand(n, generator=self.gen) < self.fixed_share
        draw = torch.randint(0, fixed.shape[0], (n,), generator=self.gen)
        eps = torch.where(use_fixed.view(-1, 1, 1, 1), fixed[draw], eps)
        x, eps = x.to(self.device), eps.to(self.device)
        slots = (torch.arange(n) + self.next) % len(self)
        self.x[slots], self.eps[slots] = x, eps
        self.target[slots] = self.teacher.reconstruct(x, eps)
        self.next = int((self.next + n) % len(self))

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self), (batch,), generator=self.gen).to(self.device)
        return self.x[idx], self.eps[idx], self.target[idx]

    def state_dict(self) -> dict:
        return {"x": self.x.cpu(), "eps": self.eps.cpu(), "target": self.target.cpu(), "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.x = state["x"].to(self.device)
        self.eps = state["eps"].to(self.device)
        self.target = state["target"].to(self.device)
        self.next = int(state["next"])
