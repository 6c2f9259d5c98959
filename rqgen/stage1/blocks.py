"""VQGAN convolutional encoder and decoder, shared by RQ-VAE and DQ-VAE.

Module names follow the taming-transformers layout the official RQ-VAE uses
(`encoder.down.{i}.block.{j}.norm1`, `decoder.up.{i}.upsample.conv`, `mid.attn_1.q`, ...), so
official checkpoints map onto these modules key for key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def Normalize(channels: int, num_groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm as VQGAN: 32 groups (every official layer has >= 128 channels). Narrow CPU
    models keep >= 4 channels per group: one channel per group would normalise away each
    image's mean colour in every residual branch."""
    if num_groups is None:
        num_groups = math.gcd(32, max(1, channels // 4))
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1×1 conv projections, as in VQGAN)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric zero padding (right/bottom), as VQGAN: keeps official weights exact.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResBlock - Attention - ResBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResBlocks (each followed by attention at attention resolutions),
    then an optional `downsample` / `upsample` set by the encoder / decoder."""

    def __init__(self, block_in: int, block_out: int, n_blocks: int, attn: bool, dropout: float):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(block_in, block_out, dropout))
            block_in = block_out
            if attn:
                self.attn.append(AttnBlock(block_out))

    def body(self, h: Tensor) -> Tensor:
        """The level's blocks, without the resampling."""
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h

    def forward(self, h: Tensor) -> Tensor:
        h = self.body(h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


def down_levels(
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    resolution: int,
    dropout: float,
) -> nn.ModuleList:
    """The encoder's levels: level i works at resolution R/2^i and all but the last end with
    a downsample."""
    levels, res, block_in = nn.ModuleList(), resolution, ch
    for i, mult in enumerate(ch_mult):
        level = Level(block_in, ch * mult, num_res_blocks, res in attn_resolutions, dropout)
        block_in = ch * mult
        if i != len(ch_mult) - 1:
            level.downsample = Downsample(block_in)
            res //= 2
        levels.append(level)
    return levels


class Encoder(nn.Module):
    """Image (B, C, R, R) -> features (B, z_channels, R/f, R/f), f = 2^(len(ch_mult) - 1)."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = down_levels(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, dropout)
        block_in = ch * ch_mult[-1]
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, R/f, R/f) -> image (B, out_channels, R, R).

    `up[i]` mirrors `down[i]` (index 0 = full resolution); each level has
    num_res_blocks + 1 blocks, as in VQGAN.
    """

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            level = Level(block_in, block_out, num_res_blocks + 1, res in attn_resolutions, dropout)
            block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # keep index i = resolution level, as the official keys
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchShortcut(nn.Module):
    """Z = E(X) + A·patches(X) and X̂ = G(Ẑ) + unpatch(B·Ẑ): each f×f patch of pixels (3f²
    values) maps linearly onto the code vector of its position, and back. Not in the paper:
    the residual-autoencoding idea of DC-AE (Chen et al. 2024, space-to-channel shortcuts)
    applied once around the whole network. A small autoencoder otherwise spends its first
    thousands of steps learning what a linear patch codec does at once (tiny32 on photos:
    26.6 dB unquantized after 1000 steps, where residual quantization of the raw 4×4 patches
    alone reaches 29.5 dB at depth 4; benchmarks/results/stage1_learning.md).

    Where the code vector has room (embed_dim >= 3f²), A and B start as the identity on the
    first 3f² channels and the encoder's and decoder's own outputs start at zero: the untrained
    model is exactly the raw-patch RQ codec, and the networks learn what it misses. Where it
    has not, A starts as the mean of the patch's (f/s)² sub-patches of side s, the largest s
    with 3s² values that fit, and B as copying that mean into each sub-patch: the untrained
    model is that coarser codec (what a DQ-VAE's coarse regions start as)."""

    def __init__(self, in_channels: int, factor: int, embed_dim: int):
        super().__init__()
        n = in_channels * factor * factor
        self.factor = factor
        self.down = nn.Conv2d(n, embed_dim, 1, bias=False)
        self.up = nn.Conv2d(embed_dim, n, 1, bias=False)
        side = factor
        while in_channels * side * side > embed_dim and side > 1:
            side //= 2
        self.side = side
        self.starts_as_codec = in_channels * side * side <= embed_dim
        if self.starts_as_codec:
            # pixel_unshuffle orders a patch's values (channel, row, column); each goes to the
            # same (channel, row, column) of its sub-patch in the code vector
            c, i, j = torch.meshgrid(
                torch.arange(in_channels), torch.arange(factor), torch.arange(factor), indexing="ij"
            )
            slot = (c * side + i % side) * side + j % side
            copy = F.one_hot(slot.flatten(), embed_dim).float()  # (n, embed_dim)
            with torch.no_grad():
                self.down.weight.copy_(copy.T[..., None, None] / (factor // side) ** 2)
                self.up.weight.copy_(copy[..., None, None])

    def start_alone(self, *outputs: nn.Conv2d) -> None:
        """Zero the networks' last layers (`outputs`) where the shortcut starts as a codec:
        the untrained model is then exactly that patch codec."""
        if self.starts_as_codec:
            for conv in outputs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def encode(self, x: Tensor) -> Tensor:
        return self.down(F.pixel_unshuffle(x, self.factor))

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(self.up(z), self.factor)


def zero_init_residual_branches(module: nn.Module) -> None:
    """Start every residual branch (a ResBlock's last conv, an attention output) at zero, so
    that the untrained network is its skip paths: a tiny autoencoder then learns faster
    (benchmarks/results/stage1_learning.md). Only the initial values change."""
    for m in module.modules():
        if isinstance(m, (ResnetBlock, AttnBlock)):
            last = m.conv2 if isinstance(m, ResnetBlock) else m.proj_out
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
