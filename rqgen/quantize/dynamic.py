"""Dynamic depth (not in the RQ or DQ papers): each position spends as many residual codes as
its residual needs, a flat sky fewer than a face, at a budget of codes per image.

A quantizer of depth D leaves the residual energies e_d = ||r_d||² (d = 0..D; e_0 = ||z||²)
at every position. Choosing depths d_n ≥ 1 with Σ_n d_n = budget to minimise Σ_n e_{d_n} is
a knapsack over positions; taking the largest marginal gains e_{d-1} - e_d first solves it
exactly when each position's gains shrink with depth. Gains that grow again are first
lowered to their running minimum, so a position's chosen codes are always a prefix of its
stack (its partial sum Ẑ(d_n), Eq. 5, is what decodes).

Dynamic code maps keep the (..., D) layout of fixed ones, with `stop` (= K, one past the
last code) in every slot past a position's depth: an end-of-stack code a depth transformer
can predict.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def energies(quantizer, codes: Tensor, residuals: Tensor) -> Tensor:
    """e_d = ||r_d||², d = 0..D: (..., D + 1), of codes (..., D) and the residuals
    r_0..r_{D-1} (..., D, dim) they were chosen for (argmin or drawn from Q_τ)."""
    last = residuals[..., -1, :] - quantizer.embed(codes[..., -1:])[..., 0, :]
    return torch.cat([residuals, last[..., None, :]], -2).pow(2).sum(-1)


@torch.no_grad()
def quantize_with_energy(quantizer, z: Tensor) -> tuple[Tensor, Tensor]:
    """Codes (..., D) of z (..., dim) and their energies (..., D + 1)."""
    codes, residuals = quantizer.quantize(z)  # residuals r_0..r_{D-1}: (..., D, dim)
    return codes, energies(quantizer, codes, residuals)


@torch.no_grad()
def stacks(quantizer, codes: Tensor, residuals: Tensor, mean_depth: float) -> Tensor:
    """Code maps (B, H, W, D) cut to round(mean_depth·H·W) codes per image where the
    residuals (B, H, W, D, dim) are largest: a dynamic code map."""
    B, H, W, _ = codes.shape
    energy = energies(quantizer, codes, residuals).view(B, H * W, -1)
    depths = allocate(energy, round(mean_depth * H * W))
    return truncate(codes, depths.view(B, H, W), quantizer.codebook_size)


def allocate(energy: Tensor, budget: int, min_depth: int = 1) -> Tensor:
    """Depths (B, N) in min_depth..D with Σ_n d_n = budget per image, for energies
    (B, N, D + 1): the budget goes to the largest (running-minimum) marginal gains."""
    B, N, D = energy.shape[0], energy.shape[1], energy.shape[2] - 1
    if not min_depth * N <= budget <= D * N:
        raise ValueError(f"a budget of {budget} codes does not fit {N} positions of depth "
                         f"{min_depth}..{D}")  # fmt: skip
    gains = (energy[..., :-1] - energy[..., 1:])[..., min_depth:]  # (B, N, D - min_depth)
    gains = gains.cummin(-1).values  # non-increasing along depth
    extra = budget - min_depth * N
    depths = torch.full((B, N), min_depth, dtype=torch.long, device=energy.device)
    if extra:
        # a position's depth is how many of its gains were chosen: with gains non-increasing
        # along depth, its first ones, whichever of tied slots topk returned
        top = gains.flatten(1).topk(extra, dim=1).indices // (D - min_depth)
        depths += torch.zeros_like(depths).scatter_add_(1, top, torch.ones_like(top))
    return depths


def truncate(codes: Tensor, depths: Tensor, stop: int) -> Tensor:
    """Codes (..., D) with every slot past each position's depth (...,) set to `stop`."""
    slot = torch.arange(codes.shape[-1], device=codes.device)
    return torch.where(slot < depths[..., None], codes, torch.full_like(codes, stop))


def forced(codes: Tensor, stop: int) -> Tensor:
    """The slots (..., D) after each stack's stop code: stops again, forced rather than drawn."""
    return torch.nn.functional.pad((codes == stop).cumsum(-1)[..., :-1], (1, 0)) > 0


def stack_depths(codes: Tensor, stop: int) -> Tensor:
    """How many codes each stack of a dynamic code map (..., D) holds: (...,)."""
    return (codes != stop).sum(-1)


def decode_stacks(quantizer, codes: Tensor) -> Tensor:
    """Ẑ(d_n) of a dynamic code map (..., D) whose stacks end at `stop` = K: (..., dim)."""
    keep = codes != quantizer.codebook_size
    vectors = quantizer.embed(torch.where(keep, codes, torch.zeros_like(codes)))
    return (vectors * keep[..., None]).sum(-2)
