"""The nearest-code search of residual quantization (Eq. 3), or a draw from Q_τ (Eq. 15).

In full fp32 (no TF32), so a GPU picks the codes a CPU does, and chunked over rows so that
N×K distances are never materialised at once: chunks of ~2 MB of distances stay in cache
between the matmul that writes them and the argmin that reads them (faster than one large
block: benchmarks/results/design_notes.md), but each chunk reads the whole codebook again,
so the caller sets a floor on the rows per chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rqgen.utils.device import exact_fp32


def nearest(
    x: Tensor, codebook: Tensor, rows: int, tau: float | None = None, generator=None
) -> Tensor:
    """Index of the nearest row of `codebook` (K, dim) for each row of x (N, dim), `rows`
    rows at a time; with `tau`, a draw from softmax(-||x - c||² / τ) instead."""
    if torch.compiler.is_compiling():
        return _chunks(x, codebook, rows, tau, generator)
    with exact_fp32():
        return _chunks(x, codebook, rows, tau, generator)


def _chunks(x: Tensor, cb: Tensor, rows: int, tau: float | None, generator) -> Tensor:
    cb_sq = cb.pow(2).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], rows):
        # ||x||² is the same for every code of a row, so argmin needs only ||e||² - 2x·e.
        dist = torch.addmm(cb_sq, x[s : s + rows], cb.t(), alpha=-2.0)
        if tau is not None:
            # Gumbel-max: argmin(d/τ - G) is a draw from softmax(-d/τ) = Q_τ (Eq. 15),
            # computed chunk by chunk like the argmin.
            u = torch.rand(dist.shape, device=x.device, generator=generator)
            dist = dist / tau + torch.log(-torch.log(u.clamp_(1e-20, 1.0)))
        out[s : s + rows] = dist.argmin(1)
    return out
