"""Teacher targets for distillation, kept in a small pool that is refreshed a few entries at a time.

A teacher target costs N denoiser passes (no gradient); a student step costs S passes forward and
backward. On a CPU the teacher would dominate, so each target is reused for about `reuse` student
batches before it is replaced. Entries are (image, noise, teacher x̂0): the noise is a fresh draw, or
(a `fixed_share` of the time) one of the scoring graph's fixed draws, the noise the student meets
at scoring time.

Healing (`defect_share` > 0): that share of the entries gets a synthetic defect pasted onto the
student's input (data/anomalies.py) while the target stays the teacher's rebuild of the clean image.
The student then learns to rebuild the good part under a defect, not to copy the defect, which widens
the reconstruction error where real defects are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffinspect.data.anomalies import paste_anomaly
from diffinspect.models.scoring import ScoringGraph


def with_defects(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A copy of images in [-1, 1] (N, C, H, W) with one synthetic defect pasted onto each."""
    u8 = ((x.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([paste_anomaly(img, rng)[0] for img in u8])
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class TargetPool:
    def __init__(
        self,
        images: torch.Tensor,
        teacher: ScoringGraph,
        size: int,
        gen: torch.Generator,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        fixed_share: float = 0.25,
        defect_share: float = 0.0,
    ) -> None:
        self.images = images  # uint8 (N, C, H, W) on the CPU
        self.teacher = teacher
        self.gen = gen
        self.augment = augment
        self.fixed_share = fixed_share
        self.defect_share = defect_share
        self.device = teacher.noise.device
        self.x = torch.zeros(size, *images.shape[1:], device=self.device)
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
        self.target[slots] = self.teacher.reconstruct(x, eps)
        if self.defect_share > 0:
            heal = (torch.rand(n, generator=self.gen) < self.defect_share).to(self.device)
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=self.gen)))
            if bool(heal.any()):
                x = x.clone()
                x[heal] = with_defects(x[heal], rng)
        self.x[slots], self.eps[slots] = x, eps
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
