"""Batched augmentation on the device: random crop with zero padding and horizontal flip."""

from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image shifted by its own random offset within ``padding`` pixels (as torchvision's RandomCrop)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, crop_padding: int = 0, hflip: bool = False) -> torch.Tensor:
    x = random_crop(x, crop_padding)
    return random_hflip(x) if hflip else x
