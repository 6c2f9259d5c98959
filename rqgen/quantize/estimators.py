"""How the gradient crosses the quantizer (`gradient_estimator`): the forward value is
always Ẑ; the estimators differ only in what reaches z in the backward pass."""

from __future__ import annotations

import torch
from torch import Tensor


def straight_through(z: Tensor, zhat: Tensor) -> Tensor:
    """Ẑ in the forward pass; the gradient reaches z unchanged (VQ-VAE's estimator)."""
    return z + (zhat - z).detach()


def rotation_trick(z: Tensor, zhat: Tensor) -> Tensor:
    """Ẑ in the forward pass; in the backward pass the gradient reaches each vector z through
    the fixed rotation and rescaling that carries z onto Ẑ (Fifty et al., ICLR 2025, Eq. 4):
    q̃ = sg[λR] z with λ = ‖Ẑ‖/‖z‖, R = I − 2 r rᵀ + 2 q̂ ẑᵀ, ẑ = z/‖z‖, q̂ = Ẑ/‖Ẑ‖,
    r = (ẑ + q̂)/‖ẑ + q̂‖. R is applied as two rank-one updates, never built."""
    rotated = _rotate(z, zhat)
    return rotated + (zhat - rotated).detach()  # the forward value stays Ẑ


def rotation_per_depth(
    z: Tensor, zhat: Tensor, partials: Tensor, depths: Tensor | None = None
) -> Tensor:
    """Ẑ(d) in the forward pass; in the backward pass the mean over depths j ≤ d of the
    rotation trick taking each depth's residual r_{j-1} = z − Ẑ(j−1) onto its code e(k_j),
    as residual-VQ libraries apply the trick per layer (there summed; the mean keeps the
    gradient straight-through's size, and is straight-through when every code equals its
    residual). zhat: each vector's Ẑ(d) (N, dim); partials: Ẑ(1..D) (D, N, dim), no gradient;
    depths: each vector's d (N,), default D."""
    prev = torch.cat([torch.zeros_like(partials[:1]), partials[:-1]])
    rotated = _rotate(z - prev, partials - prev)  # (D, N, dim)
    push = rotated - rotated.detach()  # zero forward; the rotated gradient backward
    n = len(partials)
    if depths is None:
        return zhat + push.sum(0) / n
    used = torch.arange(1, n + 1, device=z.device)[:, None] <= depths  # (D, N)
    return zhat + (push * used[..., None]).sum(0) / depths[:, None]


def _rotate(z: Tensor, zhat: Tensor, eps: float = 1e-6) -> Tensor:
    """λR z with λR fixed (no gradient through it): what carries z onto Ẑ."""
    with torch.no_grad():
        nz, nq = z.norm(dim=-1, keepdim=True), zhat.norm(dim=-1, keepdim=True)
        u, q = z / nz.clamp_min(eps), zhat / nq.clamp_min(eps)
        r = u + q
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        scale = nq / nz.clamp_min(eps)
    rotated = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * q * (u * z).sum(-1, keepdim=True)
    return scale * rotated


def cross(
    estimator: str, z: Tensor, zhat: Tensor, partials: Tensor, depths: Tensor | None = None
) -> Tensor:
    """The quantizer's output Ẑ(d) (`zhat`: each vector's own depth, default D) carrying the
    gradient `estimator` hands to z. partials: Ẑ(1..D); depths: each vector's d or None."""
    if estimator == "rotation_per_depth":
        return rotation_per_depth(z, zhat, partials, depths)
    return {"ste": straight_through, "rotation": rotation_trick}[estimator](z, zhat)


ESTIMATORS = ("ste", "rotation", "rotation_per_depth")
