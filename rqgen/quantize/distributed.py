"""Collectives used by the codebook. Each is a no-op on a single process.

The quantizer calls these so that every rank holds the same codebook at every step:
EMA statistics are summed over ranks (the update then equals the one a single process
would make on the global batch) and anything random (initialisation, restarts) is decided
on rank 0 and broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over all ranks (one collective per tensor)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Make every rank hold rank `src`'s value of `tensor` (in place)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def random_rows(pool: torch.Tensor, n: int) -> torch.Tensor:
    """n rows drawn uniformly from the rows of `pool` on ALL ranks taken together.

    Rank 0 draws global row indices and broadcasts them; each rank fills in the rows it
    holds and a sum collects them. Only n×dim values travel, and with ranks holding
    consecutive shards of a global batch the result equals what a single process drawing
    from that global batch would get (same RNG state on rank 0).
    """
    local = torch.tensor(pool.shape[0], device=pool.device)
    u = torch.rand(n, device=pool.device, dtype=torch.float64)
    if not is_distributed():
        return pool[torch.minimum((u * local).long(), local - 1)].clone()
    sizes = torch.zeros(world_size(), dtype=torch.long, device=pool.device)
    sizes[rank()] = local
    all_reduce_sum(sizes)
    # on the device throughout: no host synchronisation in a training step
    total, offset = sizes.sum(), sizes[: rank()].sum()
    idx = broadcast(torch.minimum((u * total).long(), total - 1)) - offset
    mine = (idx >= 0) & (idx < pool.shape[0])
    rows = pool[idx.clamp(0, pool.shape[0] - 1)] * mine[:, None].to(pool.dtype)
    all_reduce_sum(rows)
    return rows


def mean_norm(r: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (or w-weighted mean) norm of the rows of r (N, dim) over all ranks."""
    norm = r.norm(dim=-1)
    w = torch.ones_like(norm) if w is None else w
    sums = torch.stack([(norm * w).sum(), w.sum()])
    all_reduce_sum(sums)
    return sums[0] / sums[1].clamp_min(1e-12)
