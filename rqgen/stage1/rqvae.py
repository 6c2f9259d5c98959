"""RQ-VAE (paper §3.1): encoder E -> residual quantizer -> decoder G.

    Z = E(X) (H×W×nz),  M = RQ(Z; C, D) (H×W×D codes),  X̂ = G(Ẑ)     (Eq. 6)

Stage 2 talks to this model only through `encode` / `quantizer` / `decode_codes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rqgen.checkpoint import Pretrained
from rqgen.quantize import ResidualQuantizer, dynamic
from rqgen.stage1.blocks import Decoder, Encoder, PatchShortcut, zero_init_residual_branches


@dataclass
class RQVAEConfig:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 2  # the decoder uses one more per level, as VQGAN
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    z_channels: int = 256  # encoder output channels (nz)
    embed_dim: int = 256  # code vector dimension, after the 1×1 quant_conv
    codebook_size: int = 16384  # K
    code_depth: int = 4  # D
    shared_codebook: bool = True
    decay: float = 0.99
    commitment_weight: float = 0.25  # β
    restart_unused_codes: bool = True
    # quantizer dropout (SoundStream): in training each image's code stack ends at a random
    # depth 1..D, so that every prefix Ẑ(d) decodes well and one tokenizer serves every rate
    quantize_dropout: bool = False
    # the depths it draws from, uniformly (empty: every depth 1..D); listing only the rates a
    # model will serve, e.g. [1, 2, 4, 8], gives each a larger share of the training signal,
    # and a depth listed n times is drawn n times as often
    quantize_dropout_depths: list[int] = field(default_factory=list)
    # how the gradient crosses the quantizer: ste (straight through, the paper's), rotation
    # (the rotation trick, Fifty et al. 2025, from z onto Ẑ) or rotation_per_depth (from
    # each depth's residual onto its code, averaged); the forward pass is the same
    gradient_estimator: str = "ste"
    # the residual entering depth d divided by a per-depth scale (an EMA of its norm) before
    # the lookup, and the code multiplied back: a shared codebook then serves every depth's
    # scale (not in the paper; official models keep scale 1)
    depth_scale: bool = False
    # commitment (Eq. 7) to every partial sum Ẑ(1..D) ("all", the paper's) or to the decoded
    # sum Ẑ only ("final"; not in the paper)
    commitment: str = "all"
    # GroupNorm groups: 0 keeps >= 4 channels per group in narrow layers (gcd(32, C/4)), which
    # is 32 at official widths; converted official models set 32 everywhere, as VQGAN does.
    norm_groups: int = 0
    # residual branches initialised to zero (init only; tiny32 sets it: it learns faster)
    zero_init_residual: bool = False
    # a linear path from each f×f pixel patch to its code vector and back, beside the encoder
    # and the decoder (not in the paper; tiny32 sets it, see PatchShortcut)
    patch_shortcut: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return (self.latent_size, self.latent_size, self.code_depth)


@dataclass
class RQVAEOutput:
    reconstruction: Tensor  # X̂, (B, 3, R, R)
    codes: Tensor  # (B, H, W, D)
    commitment_loss: Tensor


class RQVAE(nn.Module, Pretrained):
    model_type = "rqvae"
    config_class = RQVAEConfig

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = config
        c = config
        if c.resolution % c.downsample_factor:
            raise ValueError(f"resolution {c.resolution} is not divisible by {c.downsample_factor}")
        shape = dict(
            ch=c.ch,
            ch_mult=c.ch_mult,
            num_res_blocks=c.num_res_blocks,
            attn_resolutions=c.attn_resolutions,
            resolution=c.resolution,
            z_channels=c.z_channels,
            dropout=c.dropout,
        )
        self.encoder = Encoder(in_channels=c.in_channels, **shape)
        self.decoder = Decoder(out_channels=c.in_channels, **shape)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.quantizer = ResidualQuantizer(
            c.embed_dim,
            c.codebook_size,
            c.code_depth,
            shared_codebook=c.shared_codebook,
            decay=c.decay,
            commitment_weight=c.commitment_weight,
            restart_unused_codes=c.restart_unused_codes,
            gradient_estimator=c.gradient_estimator,
            depth_scale=c.depth_scale,
            commitment=c.commitment,
        )
        if c.zero_init_residual:
            zero_init_residual_branches(self)
        self.patch_shortcut = None
        if c.patch_shortcut:
            self.patch_shortcut = PatchShortcut(c.in_channels, c.downsample_factor, c.embed_dim)
            self.patch_shortcut.start_alone(self.quant_conv, self.decoder.conv_out)
        if c.norm_groups:
            for m in self.modules():
                if isinstance(m, nn.GroupNorm):
                    if m.num_channels % c.norm_groups:
                        raise ValueError(
                            f"norm_groups={c.norm_groups} does not divide {m.num_channels} channels"
                        )
                    m.num_groups = c.norm_groups

    def encode(self, x: Tensor) -> Tensor:
        """Z = E(X): images (B, 3, R, R) -> features (B, H, W, embed_dim), channel-last."""
        z = self.quant_conv(self.encoder(x))
        if self.patch_shortcut is not None:
            z = z + self.patch_shortcut.encode(x)
        return z.permute(0, 2, 3, 1)

    def decode(self, zhat: Tensor) -> Tensor:
        """X̂ = G(Ẑ): features (B, H, W, embed_dim) -> images (B, 3, R, R)."""
        z = zhat.permute(0, 3, 1, 2)
        x = self.decoder(self.post_quant_conv(z))
        return x if self.patch_shortcut is None else x + self.patch_shortcut.decode(z)

    @torch.no_grad()
    def encode_to_codes(self, x: Tensor) -> Tensor:
        """Images -> code map M (B, H, W, D) (argmin codes; never updates the codebook)."""
        return self.quantizer.quantize(self.encode(x))[0]

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, depth: int | None = None) -> Tensor:
        """Codes (B, H, W, D) -> images from Ẑ(depth) (default: all D; Table 6 with d < D).
        A dynamic code map's stacks end at their stop codes (quantize/dynamic.py)."""
        return self.decode(self.quantizer.decode_codes(codes, depth))

    @torch.no_grad()
    def encode_to_stacks(self, x: Tensor, mean_depth: float) -> Tensor:
        """Images -> a dynamic code map (B, H, W, D): round(mean_depth·H·W) codes per image,
        spent where the residual is largest; slots past a stack's end hold K (dynamic.py)."""
        codes, residuals = self.quantizer.quantize(self.encode(x))
        return dynamic.stacks(self.quantizer, codes, residuals, mean_depth)

    @torch.no_grad()
    def decode_stacks(self, codes: Tensor) -> Tensor:
        """A dynamic code map (B, H, W, D) -> images, each position from its own Ẑ(d)
        (what `decode_codes` does with any code map holding stop codes)."""
        return self.decode_codes(codes)

    def forward(self, x: Tensor) -> RQVAEOutput:
        depths = None
        if self.training and self.config.quantize_dropout:  # each image its own prefix depth
            choices = self.config.quantize_dropout_depths or range(1, self.config.code_depth + 1)
            table = torch.tensor(list(choices), device=x.device)
            depths = table[torch.randint(len(table), (len(x), 1, 1), device=x.device)]
        q = self.quantizer(self.encode(x), depths=depths)
        return RQVAEOutput(self.decode(q.quantized), q.codes, q.commitment_loss)

    @property
    def last_layer(self) -> Tensor:
        """Weight the adaptive GAN weight is computed at (VQGAN: decoder.conv_out)."""
        return self.decoder.conv_out.weight
