"""Denoisers (U-Net, DiT) and the noise schedule.

Both denoisers keep one contract:
    forward(x (N, C, H, W), t (N,) float timesteps in [0, 1000)) -> predicted ε, shape of x
    features(x, t) -> list of encoder feature maps (N, D, h, w), cheap (no decoder pass)
    attributes kind, size, image_size (one side, or (height, width)), height, width, channels

The edge runtime imports `diffinspect.models.schedule` (pure numpy) without torch: importing any
submodule runs this file, so torch and the networks are imported only inside the functions below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffinspect import DiffinspectError
from diffinspect.data.image import ImageSize, input_hw
from diffinspect.vocab import Choice, ModelKind, ModelSize

if TYPE_CHECKING:
    from torch import nn

MIN_IMAGE_SIZE = 16


def _check_choice(what: str, value: str, choices: type[Choice]) -> None:
    if value not in choices.values():
        raise DiffinspectError(f"unknown model {what} {value!r}: choose one of {choices.listed()}")


def equivalent_side(image_size: ImageSize) -> float:
    """The side of the square with the input's pixel count: what depth and patch size follow from, so a
    square input gets the network it always got and a rectangle one of about the same cost per pixel."""
    h, w = input_hw(image_size)
    return (h * w) ** 0.5


def image_multiple(kind: str, size: str, image_size: ImageSize) -> int:
    """The number each image side must be a multiple of, for this kind and size at about this image size."""
    _check_choice("kind", kind, ModelKind)
    _check_choice("size", size, ModelSize)
    if kind == "unet":
        from diffinspect.models.unet import unet_downsamplings

        return 2 ** unet_downsamplings(image_size)
    from diffinspect.models.dit import dit_patch_size

    return dit_patch_size(size, image_size)


def check_image_size(kind: str, size: str, image_size: ImageSize) -> None:
    """Raise a one-line DiffinspectError if the model cannot take images of this size."""
    m = image_multiple(kind, size, image_size)
    for side in sorted(set(input_hw(image_size))):
        if side < MIN_IMAGE_SIZE:
            raise DiffinspectError(f"image size {side} is too small: use at least {MIN_IMAGE_SIZE}")
        if side % m:
            lo, hi = side // m * m, (side // m + 1) * m
            raise DiffinspectError(
                f"image size {side} does not fit the {kind}: use a multiple of {m} (e.g. {lo} or {hi})"
            )


def build_model(kind: str, size: str, image_size: ImageSize, channels: int) -> nn.Module:
    """A freshly initialized denoiser; load weights with `load_state_dict` (derived buffers are not saved)."""
    check_image_size(kind, size, image_size)
    if channels < 1:
        raise DiffinspectError(f"a model needs at least 1 image channel, got {channels}")
    if kind == "unet":
        from diffinspect.models.unet import UNet

        return UNet(size, image_size, channels)
    from diffinspect.models.dit import DiT

    return DiT(size, image_size, channels)


def describe(model: nn.Module, image_size: ImageSize, channels: int) -> dict[str, Any]:
    """Parameter count and GFLOPs of one forward pass on one frame.

    FLOPs are those torch's FlopCounterMode counts: matmuls and convolutions, 2 per multiply-add;
    norms, activations and softmax are left out (a few percent here).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, channels, *input_hw(image_size))
    t = torch.zeros(1)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t)
    return {
        "kind": getattr(model, "kind", type(model).__name__),
        "size": getattr(model, "size", None),
        "params": sum(p.numel() for p in model.parameters()),
        "gflops": counter.get_total_flops() / 1e9,
    }
