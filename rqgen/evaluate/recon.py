"""Reconstruction metrics (PSNR, SSIM) and codebook statistics (usage, perplexity)."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

PSNR_MAX_DB = 100.0  # identical images would give +inf; a finite cap keeps dataset means usable


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1,1] images (B,C,H,W), measured on [0,1], capped at 100 dB."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(dim=1)
    # mse floor 1e-10 <=> 100 dB, so identical images get exactly the cap instead of inf
    return 10.0 * torch.log10(1.0 / mse.clamp_min(10.0 ** (-PSNR_MAX_DB / 10.0)))


SSIM_WORDS = "images mapped from [-1, 1] to [0, 1], data range 1; gaussian window 11, σ 1.5"


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (gaussian window 11, sigma 1.5) of [-1,1] images, measured on [0,1]."""
    return structural_similarity_index_measure(
        _to_unit(x), _to_unit(y), gaussian_kernel=True, sigma=1.5, data_range=1.0, reduction="none"
    )


class CodeStats:
    """Histogram of code indices: codebook usage and perplexity, overall and per depth.

    `update` takes integer codes of any shape; the axis `depth_axis` (default last, as in RQ's
    (B,H,W,D) codes) indexes the residual depth for the per-depth statistics. Pass
    `depth_axis=None` for codes without a depth axis.
    """

    def __init__(self, codebook_size: int, depth_axis: int | None = -1) -> None:
        self.codebook_size = codebook_size
        self.depth_axis = depth_axis
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.codebook_size, dtype=torch.long)
        self.depth_counts: torch.Tensor | None = None  # (D, K), created on first update

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        codes = codes.detach().long().cpu()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        k = self.codebook_size
        if self.depth_axis is not None:
            d = codes.shape[self.depth_axis]
            if self.depth_counts is not None and self.depth_counts.shape[0] != d:
                raise ValueError(f"depth changed from {self.depth_counts.shape[0]} to {d}")
            # offset depth j's codes by j*K so one bincount yields all D histograms
            per_depth = codes.movedim(self.depth_axis, -1).reshape(-1, d) + torch.arange(d) * k
            hist = torch.bincount(per_depth.flatten(), minlength=d * k).view(d, k)
            self.depth_counts = hist if self.depth_counts is None else self.depth_counts + hist
        self.counts += torch.bincount(codes.flatten(), minlength=k)

    def _hists(self, per_depth: bool) -> torch.Tensor:
        if not per_depth:
            return self.counts[None]
        if self.depth_counts is None:
            raise ValueError("no per-depth counts: depth_axis is None or update() was never called")
        return self.depth_counts

    def usage(self, per_depth: bool = False) -> float | list[float]:
        """Fraction of the K codes used at least once (a list over depths if per_depth)."""
        used = (self._hists(per_depth) > 0).double().mean(dim=1).tolist()
        return used if per_depth else used[0]

    def perplexity(self, per_depth: bool = False) -> float | list[float]:
        """exp(entropy) of the empirical code distribution: K when uniform, 1 when one code."""
        h = self._hists(per_depth).double()
        p = h / h.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=1)
        ppl = entropy.exp().tolist()
        return ppl if per_depth else ppl[0]

    def summary(self) -> dict[str, float]:
        """Flat dict for logging: usage, perplexity, and per-depth values when available."""
        out = {"usage": self.usage(), "perplexity": self.perplexity()}
        if self.depth_counts is not None:
            for j, (u, p) in enumerate(zip(self.usage(True), self.perplexity(True))):
                out[f"usage_d{j}"], out[f"perplexity_d{j}"] = u, p
        return out
