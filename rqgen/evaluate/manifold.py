"""Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator computes
them: each set's manifold is the union of balls around its feature vectors, each ball's
radius the distance to that vector's k-th nearest neighbour in its own set (k = 3);
precision is the fraction of samples inside the reference manifold, recall the fraction of
reference vectors inside the sample manifold.

Distances are squared Euclidean, compared with squared radii (the same test), computed in
blocks so that memory is one block of distances, not N × M. The ADM evaluator computes
the distances in fp16 (fp32 where fp16 overflows); here they are fp32 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEIGHBOURS = 3  # k: the ADM evaluator's (and the paper's) neighbourhood size
ROWS, COLS = 1024, 8192  # a block of distances held at once: 32 MiB


def squared_distances(u: Tensor, v: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M): ||u||² − 2 u·v + ||v||², clamped at 0 (rounding)."""
    d = u.pow(2).sum(1)[:, None] - 2 * u @ v.T + v.pow(2).sum(1)[None, :]
    return d.clamp_min_(0)


def manifold_radii(features: Tensor, k: int = NEIGHBOURS) -> Tensor:
    """Squared distance of every vector to its k-th nearest neighbour in the same set (the
    vector itself, at distance 0, is neighbour 0)."""
    f = features.float()
    if len(f) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} vectors per set")
    radii = []
    for r in range(0, len(f), ROWS):
        nearest = None  # the k + 1 smallest distances of each row seen so far
        for c in range(0, len(f), COLS):
            d = squared_distances(f[r : r + ROWS], f[c : c + COLS])
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def coverage(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Fraction of `points` inside at least one ball (centre, squared radius)."""
    p, c = points.float(), centres.float()
    inside = torch.zeros(len(p), dtype=torch.bool)
    for r in range(0, len(p), ROWS):
        for s in range(0, len(c), COLS):
            d = squared_distances(p[r : r + ROWS], c[s : s + COLS])
            inside[r : r + ROWS] |= (d <= radii[None, s : s + COLS]).any(1).cpu()
    return float(inside.double().mean())


def precision_recall(
    reference: Tensor, samples: Tensor, k: int = NEIGHBOURS
) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` feature vectors (N, D)."""
    ref_radii, sample_radii = manifold_radii(reference, k), manifold_radii(samples, k)
    return coverage(samples, reference, ref_radii), coverage(reference, samples, sample_radii)
