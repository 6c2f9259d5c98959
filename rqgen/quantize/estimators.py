"""How the gradient crosses the quantizer (`gradient_estimator`): the forward value is
always Ẑ; the estimators differ only in what reaches z in the backward pass."""

from __future__ import annotations

import torch
from torch import Tensor


def straight_through(z: Tensor, zhat: Tensor) -> Tensor:
    """Ẑ in the forward pass; the gradient reaches z unchanged (VQ-VAE's estimator)."""
    return z + (zhat - z).detach()


def rotation_trick(z: Tensor, zhat: Tensor, eps: float = 1e-6) -> Tensor:
    """Ẑ in the forward pass; in the backward pass the gradient reaches each vector z through
    the fixed rotation and rescaling that carries z onto Ẑ (Fifty et al., ICLR 2025, Eq. 4):
    q̃ = sg[λR] z with λ = ‖Ẑ‖/‖z‖, R = I − 2 r rᵀ + 2 q̂ ẑᵀ, ẑ = z/‖z‖, q̂ = Ẑ/‖Ẑ‖,
    r = (ẑ + q̂)/‖ẑ + q̂‖. R is applied as two rank-one updates, never built."""
    with torch.no_grad():
        nz, nq = z.norm(dim=-1, keepdim=True), zhat.norm(dim=-1, keepdim=True)
        u, q = z / nz.clamp_min(eps), zhat / nq.clamp_min(eps)
        r = u + q
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        scale = nq / nz.clamp_min(eps)
    rotated = z - 2 * r * (r * z).sum(-1, keepdim=True) + 2 * q * (u * z).sum(-1, keepdim=True)
    rotated = scale * rotated
    return rotated + (zhat - rotated).detach()  # the forward value stays Ẑ


ESTIMATORS = {"ste": straight_through, "rotation": rotation_trick}
