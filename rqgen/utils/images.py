"""Tensor <-> image file helpers. Tensors are (B, 3, H, W) floats in [-1, 1]."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rqgen.utils.files import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 HWC (or BHWC) array."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(x))


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile (B, 3, H, W) into one (3, H', W') image, `nrow` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for i, img in enumerate(images.detach().cpu()):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    return grid


def save_image(x: torch.Tensor, path: str | Path, upscale: int = 1) -> Path:
    """Write one (3, H, W) image, atomically (a full disk leaves no torn PNG); `upscale`
    enlarges tiny images (nearest) for viewing."""
    path = Path(path)
    img = to_pil(x)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt), needed_bytes=len(img.tobytes()))
    return path


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1
) -> Path:
    return save_image(make_grid(images, nrow), path, upscale)
