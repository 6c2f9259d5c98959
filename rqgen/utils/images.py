"""Tensor <-> image file helpers. Tensors are (B, 3, H, W) floats in [-1, 1]."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def class_rows(images: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, int]:
    """Images reordered for a grid with one row per class (in label order), rows padded
    with white where a class has fewer samples; returns (images, images per row)."""
    classes = sorted(set(labels))
    per_class = [[i for i, c in enumerate(labels) if c == k] for k in classes]
    width = max(map(len, per_class))
    blank = torch.ones_like(images[0])
    rows: list[torch.Tensor] = []
    for idx in per_class:
        rows += [images[i] for i in idx] + [blank] * (width - len(idx))
    return torch.stack(rows), width


def enlarge(img: Image.Image, scale: int) -> Image.Image:
    """Tiny images made viewable: each pixel a scale×scale block (nearest)."""
    return img if scale <= 1 else img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_image(x: torch.Tensor, path: str | Path, upscale: int = 1) -> Path:
    """Write one (3, H, W) image, atomically (a full disk leaves no torn PNG); `upscale`
    enlarges tiny images (nearest) for viewing."""
    return save_pil(enlarge(to_pil(x), upscale), path)


def save_pil(img: Image.Image, path: str | Path) -> Path:
    """A PIL image to `path` atomically, in the format its suffix names (PNG otherwise)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt), needed_bytes=len(img.tobytes()))
    return path


def save_labelled_grid(
    images: torch.Tensor,
    path: str | Path,
    labels: list[str],
    upscale: int = 1,
    legend: str | None = None,
) -> Path:
    """`labelled_row` written to `path`."""
    return save_pil(labelled_row(images, labels, upscale, legend), path)


def labelled_row(
    images: torch.Tensor,
    labels: list[str],
    upscale: int = 1,
    legend: str | None = None,
    pad: int = 2,
) -> Image.Image:
    """One row of images with a caption over each (e.g. "input", "depth 1" ...) and an
    optional legend line under them."""

    grid = enlarge(to_pil(make_grid(images, nrow=len(images), pad=pad)), upscale)
    font = ImageFont.load_default()
    band = 14
    probe = ImageDraw.Draw(grid)
    width = max(grid.width, int(probe.textlength(legend or "", font=font)) + 8)
    canvas = Image.new("RGB", (width, grid.height + band * (2 if legend else 1)), "white")
    canvas.paste(grid, (0, band))
    draw = ImageDraw.Draw(canvas)
    w = images.shape[-1]
    for i, text in enumerate(labels):
        centre = (pad + i * (w + pad) + w / 2) * upscale
        draw.text((centre - draw.textlength(text, font=font) / 2, 1), text, fill="black", font=font)
    if legend:
        draw.text((4, grid.height + band + 1), legend, fill="black", font=font)
    return canvas


def error_map(x: torch.Tensor, x_hat: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|x - x̂| of [-1, 1] images, magnified `gain` times, as an image (black: exact)."""
    return ((x - x_hat).abs() / 2 * gain).clamp(0, 1) * 2 - 1


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """PIL images one under the other, left-aligned on white."""
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for r in rows:
        canvas.paste(r, (0, top))
        top += r.height
    return canvas


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1
) -> Path:
    return save_image(make_grid(images, nrow), path, upscale)
