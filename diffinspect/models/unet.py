"""DDPM-style U-Net that predicts the noise ε of a noised image.

Layout (Ho et al. 2020, simplified): conv_in → encoder levels (residual blocks, a strided conv
between levels) → middle (residual block, self-attention, residual block) → decoder levels (each
reads the encoder skip at its resolution, nearest-neighbour upsampling between levels) → conv_out.

Self-attention is used only in the middle, at the lowest resolution, and the number of levels
grows with the image size so that resolution stays at or below 16×16: attention at full resolution
dominates the step at large inputs (DESIGN.md's known traps). With 3 downsamplings (up to 128 px) the network is fully
convolutional for any multiple of 8; above 128 px it downsamples once more per doubling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffinspect.data.image import ImageSize, input_hw
from diffinspect.models.common import TimestepEmbedding, attention, group_norm

MAX_ATTENTION_RES = 16


@dataclass(frozen=True)
class UNetConfig:
    base: int  # channels at full resolution
    mults: tuple[int, ...]  # channel multiplier per level, full resolution first
    blocks: int  # residual blocks per level
    head_dim: int = 64


UNET_SIZES = {
    "tiny": UNetConfig(base=16, mults=(1, 1, 2, 2), blocks=1),
    "small": UNetConfig(base=32, mults=(1, 1, 2, 4), blocks=1),
    "base": UNetConfig(base=96, mults=(1, 2, 3, 4), blocks=2),
}


def unet_downsamplings(image_size: ImageSize) -> int:
    """3 for up to 128 px; one more per doubling above, so the lowest resolution stays <= 16 (for a
    rectangle, its pixel count stays <= 16²)."""
    from diffinspect.models import equivalent_side

    return max(3, math.ceil(math.log2(equivalent_side(image_size) / MAX_ATTENTION_RES) - 1e-9))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between as a per-channel bias."""

    def __init__(self, cin: int, cout: int, temb_dim: int) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels of a (small) feature map, residual."""

    def __init__(self, ch: int, head_dim: int) -> None:
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        # Zero-init so the block starts as the identity (DDPM does the same).
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-2, -1) for i in range(3))  # (n, heads, hw, d)
        out = attention(q, k, v).transpose(-2, -1).reshape(n, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    kind = "unet"

    def __init__(self, size: str, image_size: ImageSize, channels: int) -> None:
        super().__init__()
        cfg = UNET_SIZES[size]
        self.size, self.image_size, self.channels = size, image_size, channels
        self.height, self.width = input_hw(image_size)
        self.downsamplings = unet_downsamplings(image_size)
        # One channel multiplier per level (downsamplings + 1 levels); extra levels repeat the last.
        mults = list(cfg.mults) + [cfg.mults[-1]] * (self.downsamplings + 1 - len(cfg.mults))
        chs = [cfg.base * m for m in mults]
        temb_dim = 4 * cfg.base
        self.time_embed = TimestepEmbedding(cfg.base, temb_dim)
        self.conv_in = nn.Conv2d(channels, chs[0], 3, padding=1)

        # Encoder: level i runs at 1/2^i resolution; every level but the first starts with a strided conv.
        self.down = nn.ModuleList()
        self.enc = nn.ModuleList()
        for i, ch in enumerate(chs):
            cin = chs[i - 1] if i else chs[0]
            self.down.append(nn.Conv2d(cin, ch, 3, stride=2, padding=1) if i else nn.Identity())
            self.enc.append(nn.ModuleList(ResBlock(ch, ch, temb_dim) for _ in range(cfg.blocks)))

        self.mid1 = ResBlock(chs[-1], chs[-1], temb_dim)
        self.mid_attn = AttnBlock(chs[-1], cfg.head_dim)
        self.mid2 = ResBlock(chs[-1], chs[-1], temb_dim)

        # Decoder mirrors the encoder: the first block of each level takes the concatenated skip.
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, ch in enumerate(chs):
            blocks = [ResBlock(2 * ch, ch, temb_dim)] + [
                ResBlock(ch, ch, temb_dim) for _ in range(cfg.blocks - 1)
            ]
            self.dec.append(nn.ModuleList(blocks))
            self.up.append(nn.Conv2d(ch, chs[i - 1], 3, padding=1) if i else nn.Identity())

        self.norm_out = group_norm(chs[0])
        self.conv_out = nn.Conv2d(chs[0], channels, 3, padding=1)
        # Zero-init the output so training starts from "predict ε = 0" instead of a random field.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _encode(self, x: torch.Tensor, temb: torch.Tensor, levels: int) -> list[torch.Tensor]:
        h = self.conv_in(x)
        skips = []
        for down, blocks in zip(self.down[:levels], self.enc[:levels], strict=True):
            h = down(h)
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
        return skips

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) noised images, t: (N,) float timesteps → predicted ε, same shape as x."""
        temb = self.time_embed(t)
        skips = self._encode(x, temb, len(self.enc))
        h = self.mid2(self.mid_attn(self.mid1(skips[-1], temb)), temb)
        for i in reversed(range(len(self.dec))):
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.dec[i]:
                h = block(h, temb)
            if i:
                h = self.up[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    def features(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs of the three lowest-resolution levels (1/2, 1/4, 1/8 up to 128 px); no decoder."""
        return self._encode(x, self.time_embed(t), len(self.enc))[-3:]
