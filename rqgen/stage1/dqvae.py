"""DQ-VAE (Huang et al., CVPR 2023): dual-granularity codes, one per smooth region and four
per detailed region, chosen per image by a granularity router.

    h_f, h_c = E_fine(X), E_coarse(X)       one trunk; fine head before the last downsample
    g = router(X or h_c, h_f)                g = 1: the region gets four fine codes
    Z = where(g↑2, h_f, h_c↑2)               merged on the fine grid (nearest upsampling)
        (+ where(g↑2, A·p, avg(A·p)↑2))      with the patch shortcut: p the f×f pixel patches
    M = Q(Z)                                 the shared EMA codebook of RQ-VAE with D = 1
    X̂ = G(Ẑ + PE) (+ unpatch(B·Ẑ))          PE: learned row/column + Fourier features

A coarse code sits in all four fine cells of its region; those copies weigh 1/4 in the
commitment loss and the codebook statistics, so every region counts once.

Code maps are `packed`: (B, 2Hc, 2Hc, 2) int64 with [..., 0] the code of each fine cell and
[..., 1] its granularity (0 coarse, 1 fine). `unpack_codes` gives (codes, fine_mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.checkpoint import Pretrained
from rqgen.errors import ConfigError
from rqgen.quantize import ResidualQuantizer
from rqgen.stage1.blocks import (
    Decoder,
    MidBlock,
    Normalize,
    PatchShortcut,
    down_levels,
    zero_init_residual_branches,
)
from rqgen.stage1.dq_router import EntropyRouter, LearnedRouter


@dataclass
class DQVAEConfig:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    # encoder levels: the coarse head follows the last one, the fine head the one before
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])  # from the fine grid
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16, 32])
    decoder_attn_resolutions: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    decay: float = 0.99
    commitment_weight: float = 0.25
    restart_unused_codes: bool = True
    # how the gradient crosses the quantizer: ste (straight through, the paper's), rotation
    # (the rotation trick, Fifty et al. 2025, from z onto Ẑ) or rotation_per_depth (from
    # each depth's residual onto its code, averaged); the forward pass is the same
    gradient_estimator: str = "ste"
    router: str = "entropy"  # entropy | learned
    fine_fraction: float = 0.5  # r: target share of regions that get fine codes
    budget_weight: float = 10.0  # γ of the learned router's budget loss
    entropy_bins: int = 32
    # residual branches initialised to zero (init only; dq-tiny32 sets it, as tiny32)
    zero_init_residual: bool = False
    # RQ-VAE's linear patch shortcut on the fine grid; a coarse region's shortcut code is the
    # mean of its four fine ones (not in either paper; dq-tiny32 sets it, as tiny32)
    patch_shortcut: bool = False

    @property
    def coarse_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def fine_size(self) -> int:
        return 2 * self.coarse_size

    @property
    def code_depth(self) -> int:
        return 1

    @property
    def code_shape(self) -> tuple[int, int, int]:
        """Shape of a packed code map per image: fine grid × (code, granularity)."""
        return (self.fine_size, self.fine_size, 2)


@dataclass
class DQVAEOutput:
    reconstruction: Tensor  # (B, 3, R, R)
    codes: Tensor  # packed (B, 2Hc, 2Hc, 2)
    commitment_loss: Tensor
    budget_loss: Tensor  # 0 for the entropy router
    fine_mask: Tensor  # (B, Hc, Hc) float, 1 = fine (differentiable for the learned router)


def _spread(h: Tensor) -> Tensor:
    """Coarse grid -> fine grid, each region's value in its four cells: (..., H, W) ->
    (..., 2H, 2W)."""
    return h.repeat_interleave(2, -2).repeat_interleave(2, -1)


def pack_codes(codes: Tensor, fine_mask: Tensor) -> Tensor:
    """codes (B, Hf, Hf), fine_mask (B, Hc, Hc) -> packed (B, Hf, Hf, 2)."""
    grain = _spread(fine_mask.long())
    return torch.stack([codes.long(), grain], -1)


def unpack_codes(packed: Tensor) -> tuple[Tensor, Tensor]:
    """packed (B, Hf, Hf, 2) -> codes (B, Hf, Hf), fine_mask (B, Hc, Hc) bool."""
    return packed[..., 0], packed[:, ::2, ::2, 1].bool()


class EncoderHead(nn.Module):
    """Mid block (Res-Attn-Res), GroupNorm, SiLU, 3×3 conv to z_channels."""

    def __init__(self, channels: int, z_channels: int, dropout: float):
        super().__init__()
        self.mid = MidBlock(channels, dropout)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, z_channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class DualGrainEncoder(nn.Module):
    """VQGAN trunk with two heads: fine features before the last downsample, coarse after."""

    def __init__(self, c: DQVAEConfig):
        super().__init__()
        if len(c.ch_mult) < 2:
            raise ConfigError("DQ-VAE needs at least two encoder levels (ch_mult)")
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = down_levels(
            c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.resolution, c.dropout
        )
        self.fine_channels, self.coarse_channels = c.ch * c.ch_mult[-2], c.ch * c.ch_mult[-1]
        self.fine_head = EncoderHead(self.fine_channels, c.z_channels, c.dropout)
        self.coarse_head = EncoderHead(self.coarse_channels, c.z_channels, c.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (h_coarse (B, z, Hc, Hc), h_fine (B, z, 2Hc, 2Hc))."""
        h = self.conv_in(x)
        for level in self.down[:-2]:
            h = level(h)
        h_fine = self.down[-2].body(h)
        h = self.down[-1](self.down[-2].downsample(h_fine))
        return self.coarse_head(h), self.fine_head(h_fine)


class PositionEncoding2D(nn.Module):
    """Learned row and column embeddings plus Fourier features sin(W·(x, y)) of the cell
    coordinates in [-1, 1], added to the decoder input: the four copies of a coarse code
    then differ, so the decoder can paint a smooth region instead of four equal tiles."""

    def __init__(self, size: int, channels: int):
        super().__init__()
        self.row = nn.Parameter(torch.randn(size, channels) * 0.02)
        self.col = nn.Parameter(torch.randn(size, channels) * 0.02)
        self.fourier = nn.Conv2d(2, channels, 1)
        bound = math.sqrt(9 / 2)  # SIREN-style first-layer init: several periods over the grid
        nn.init.uniform_(self.fourier.weight, -bound, bound)
        axis = torch.linspace(-1, 1, size)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="xy"))  # (2, H, W): x, y
        self.register_buffer("coords", coords[None], persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        learned = (self.row[:, None, :] + self.col[None, :, :]).permute(2, 0, 1)
        return h + torch.sin(self.fourier(self.coords)) + learned


class DQVAE(nn.Module, Pretrained):
    model_type = "dqvae"
    config_class = DQVAEConfig
    # written by newer versions; a checkpoint without it loads with the argmax fallback
    optional_state = ("router.eval_threshold",)

    def __init__(self, config: DQVAEConfig):
        super().__init__()
        self.config = c = config
        if len(c.decoder_ch_mult) != len(c.ch_mult) - 1:
            raise ConfigError(
                f"decoder_ch_mult needs {len(c.ch_mult) - 1} levels (one fewer than ch_mult) so "
                f"that it starts from the fine grid; got {len(c.decoder_ch_mult)}"
            )
        if c.resolution % 2 ** (len(c.ch_mult) - 1):
            raise ConfigError(f"resolution {c.resolution} does not fit {len(c.ch_mult)} levels")
        if c.router not in ("entropy", "learned"):
            raise ConfigError(f"model.router={c.router!r}: use entropy or learned")
        self.encoder = DualGrainEncoder(c)
        if c.router == "entropy":
            self.router = EntropyRouter(c.coarse_size, c.fine_fraction, c.entropy_bins)
        else:
            self.router = LearnedRouter(
                c.z_channels, c.z_channels, c.fine_fraction, c.budget_weight
            )
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.quantizer = ResidualQuantizer(
            c.embed_dim,
            c.codebook_size,
            1,
            decay=c.decay,
            commitment_weight=c.commitment_weight,
            restart_unused_codes=c.restart_unused_codes,
            gradient_estimator=c.gradient_estimator,
        )
        self.position = PositionEncoding2D(c.fine_size, c.z_channels)
        self.decoder = Decoder(
            out_channels=c.in_channels,
            ch=c.ch,
            ch_mult=c.decoder_ch_mult,
            num_res_blocks=c.num_res_blocks,
            attn_resolutions=c.decoder_attn_resolutions,
            resolution=c.resolution,
            z_channels=c.z_channels,
            dropout=c.dropout,
        )
        if c.zero_init_residual:
            zero_init_residual_branches(self)
        self.patch_shortcut = None
        if c.patch_shortcut:
            factor = c.resolution // c.fine_size
            self.patch_shortcut = PatchShortcut(c.in_channels, factor, c.embed_dim)
            self.patch_shortcut.start_alone(self.quant_conv, self.decoder.conv_out)

    # ------------------------------------------------------------------ routing
    @property
    def needs_router_fit(self) -> bool:
        return isinstance(self.router, EntropyRouter) and bool(torch.isnan(self.router.threshold))

    def fit_router(self, batches) -> float:
        """Entropy router: threshold from training images for the target fine fraction."""
        if not isinstance(self.router, EntropyRouter):
            raise ConfigError("only the entropy router is fitted; the learned one is trained")
        return self.router.fit(batches)

    def route(self, x: Tensor, h_coarse: Tensor, h_fine: Tensor) -> tuple[Tensor, Tensor]:
        """-> (gate (B, Hc, Hc) float, 1 = fine; budget loss)."""
        if isinstance(self.router, EntropyRouter):
            return self.router(x).float(), h_coarse.new_zeros(())
        return self.router(h_coarse, h_fine)

    # ------------------------------------------------------------------ encode
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images -> (merged features (B, 2Hc, 2Hc, embed_dim) channel-last, gate, budget)."""
        h_coarse, h_fine = self.encoder(x)
        gate, budget = self.route(x, h_coarse, h_fine)
        g = _spread(gate)[:, None]  # (B, 1, Hf, Hf)
        merged = torch.where(g > 0.5, h_fine, _spread(h_coarse))
        if self.training and isinstance(self.router, LearnedRouter):
            # the hard gate's value is 1 on the chosen branch; multiplying by it passes the
            # reconstruction gradient to the router's logits (straight-through)
            merged = merged * torch.where(g > 0.5, g, 1 - g)
        z = self.quant_conv(merged)
        if self.patch_shortcut is not None:
            fine = self.patch_shortcut.encode(x)
            z = z + torch.where(g > 0.5, fine, _spread(F.avg_pool2d(fine, 2)))
        return z.permute(0, 2, 3, 1), gate, budget

    @torch.no_grad()
    def encode_to_codes(self, x: Tensor) -> Tensor:
        """Images -> packed code map (B, 2Hc, 2Hc, 2) (argmin codes; the codebook is not
        updated)."""
        z, gate, _ = self.encode(x)
        codes = self.quantizer.quantize(z)[0][..., 0]
        return pack_codes(codes, gate > 0.5)

    # ------------------------------------------------------------------ decode
    def decode(self, zhat: Tensor) -> Tensor:
        """Quantized features (B, 2Hc, 2Hc, embed_dim) -> images (B, 3, R, R)."""
        z = zhat.permute(0, 3, 1, 2)
        x = self.decoder(self.position(self.post_quant_conv(z)))
        return x if self.patch_shortcut is None else x + self.patch_shortcut.decode(z)

    @torch.no_grad()
    def decode_codes(self, packed: Tensor, depth: int | None = None) -> Tensor:
        """Packed code map -> images (`depth` is accepted for RQ-VAE's signature; D = 1)."""
        return self.decode(self.quantizer.decode_codes(packed[..., :1]))

    def forward(self, x: Tensor) -> DQVAEOutput:
        z, gate, budget = self.encode(x)
        fine = _spread(gate > 0.5)
        weights = torch.where(fine, 1.0, 0.25)  # each coarse region counts once
        q = self.quantizer(z, weights=weights)
        return DQVAEOutput(
            reconstruction=self.decode(q.quantized),
            codes=pack_codes(q.codes[..., 0], gate > 0.5),
            commitment_loss=q.commitment_loss,
            budget_loss=budget,
            fine_mask=gate,
        )

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    def tokens_per_image(self, packed: Tensor) -> Tensor:
        """Number of codes each image's sequence carries: Nc + 4·Nf, (B,)."""
        fine = unpack_codes(packed)[1].flatten(1).sum(1)
        return (self.config.coarse_size**2 - fine) + 4 * fine
