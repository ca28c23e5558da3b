"""Batched image transforms: uint8 batches to a model's input size and normalisation in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zoo.errors import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BatchTransform", "make_transform", "transform_for_model"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchTransform:
    """uint8 or [0, 1] float ``(B, C, H, W)`` batch -> normalised float32 ``(B, C', S, S')`` batch.

    Grey images are repeated to 3 channels (RGB to grey uses ITU-R 601 luma weights when the model
    wants 1), the whole batch is resized with one ``F.interpolate`` call (antialiased when
    shrinking), then normalised with the model's mean and std. Picklable, so loader workers can run it.
    """

    def __init__(self, input_size: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        self.input_size = tuple(int(s) for s in input_size)
        channels = self.input_size[0]
        if len(mean) != channels or len(std) != channels:
            raise DataError(f"mean/std need {channels} values for input size {self.input_size}")
        if interpolation not in ("nearest", "bilinear", "bicubic", "area"):
            raise DataError(f"unknown interpolation {interpolation!r}: use bilinear, bicubic, nearest or area")
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 3:
            return self(images.unsqueeze(0)).squeeze(0)
        x = images.to(torch.float32).mul_(1.0 / 255.0) if images.dtype == torch.uint8 else images.float()
        channels, height, width = self.input_size
        if x.shape[1] not in (channels, 1) and not (x.shape[1] == 3 and channels == 1):
            raise DataError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
        if x.shape[-2:] != (height, width):
            # Resize before repeating grey channels: a third of the work.
            kwargs: dict[str, Any] = {}
            if self.interpolation in ("bilinear", "bicubic"):
                # Antialias only matters when shrinking; it avoids aliasing of large photos.
                kwargs = {"align_corners": False, "antialias": x.shape[-2] > height or x.shape[-1] > width}
            x = F.interpolate(x, size=(height, width), mode=self.interpolation, **kwargs)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots
        if x.shape[1] == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        # Broadcasting a 1-channel batch against 3-channel mean/std repeats the grey channel for free.
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __repr__(self) -> str:
        return (f"BatchTransform(input_size={self.input_size}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}, interpolation={self.interpolation!r})")


def make_transform(input_size: int | Sequence[int] = 224, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, interpolation: str = "bilinear") -> BatchTransform:
    """Build a batched transform to a model's input size and normalisation.

    Args:
        input_size: ``S``, ``(H, W)`` or timm's ``(C, H, W)``; channels default to ``len(mean)``.
        mean: per-channel mean (timm data config ``mean``); ``None``: ImageNet's.
        std: per-channel std (timm data config ``std``); ``None``: ImageNet's.
        interpolation: ``"bilinear"`` (default), ``"bicubic"``, ``"nearest"`` or ``"area"``.

    Returns:
        A :class:`BatchTransform`.
    """
    mean = tuple(IMAGENET_MEAN if mean is None else mean)
    std = tuple(IMAGENET_STD if std is None else std)
    if isinstance(input_size, int):
        size = (len(mean), input_size, input_size)
    elif len(input_size) == 2:
        size = (len(mean), *input_size)
    elif len(input_size) == 3:
        size = tuple(input_size)
    else:
        raise DataError(f"input_size must be S, (H, W) or (C, H, W), got {input_size}")
    return BatchTransform(size, mean, std, interpolation)


def transform_for_model(model: torch.nn.Module) -> BatchTransform:
    """:func:`make_transform` from the model's timm data config (input size, mean, std, interpolation)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    interpolation = config.get("interpolation", "bilinear")
    if interpolation not in ("nearest", "bilinear", "bicubic", "area"):
        interpolation = "bilinear"  # e.g. "random" for training configs
    return make_transform(config["input_size"], config["mean"], config["std"], interpolation)
