"""Feature statistics of an image set and the scores computed from them: Fréchet distance
(FID, and sFID on spatial features), KID, Inception Score, improved precision/recall.

Statistics stream: features are summed in float64 batch by batch; rows are kept (a seeded
subset, or all of them) only where a score needs the vectors themselves (KID, precision /
recall, --save-features). Under torchrun each rank keeps its share and `merge_shares` puts
them together in index order, so N processes score what one would.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rqgen.errors import DataError
from rqgen.evaluate.fid import _Precomputed as _Identity  # features already computed
from rqgen.evaluate.generation import Evaluator
from rqgen.utils.files import atomic_write


@dataclass
class FeatureStats:
    """Mean and covariance of one image set's features, the rows kept (a seeded subset, or
    all of them) for KID and precision/recall, and the spatial features' mean and
    covariance (sFID) when the evaluator has them."""

    evaluator: str
    n: int
    mu: np.ndarray
    sigma: np.ndarray
    subset: np.ndarray
    source: str = ""
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    def spatial(self) -> FeatureStats | None:
        """The spatial features' statistics as a FeatureStats of their own, if any."""
        if self.mu_s is None:
            return None
        return FeatureStats(self.evaluator, self.n, self.mu_s, self.sigma_s, np.zeros((0, 0)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        extra = {} if self.mu_s is None else {"mu_s": self.mu_s, "sigma_s": self.sigma_s}

        def write(tmp):
            with open(tmp, "wb") as f:  # a handle: numpy would append .npz to a name
                np.savez(
                    f,
                    mu=self.mu,
                    sigma=self.sigma,
                    subset=self.subset.astype(np.float32),
                    n=self.n,
                    evaluator=self.evaluator,
                    source=self.source,
                    **extra,
                )

        size = self.sigma.nbytes + self.subset.nbytes + sum(a.nbytes for a in extra.values())
        atomic_write(path, write, needed_bytes=size)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        try:
            # our own handle: numpy leaves its file open when the zip is corrupt
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                spatial = (z["mu_s"], z["sigma_s"]) if "mu_s" in z.files else (None, None)
                return cls(
                    str(z["evaluator"]),
                    int(z["n"]),
                    z["mu"],
                    z["sigma"],
                    z["subset"].astype(np.float32),
                    str(z["source"]),
                    *spatial,
                )
        except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:
            raise DataError(f"'{path}' is not a statistics file written by rqgen fid-stats") from e


class StatsAccumulator:
    """Streams feature batches: float64 sums for mean/covariance, and rows (float32) for
    KID and precision/recall: all of them with `keep=None`, else a subset of `keep`. Without
    `total` the subset is a reservoir sample; with `total` (the number of images, known up
    front, numbered 0..total-1) it is a seeded choice of indices, so that processes sharing
    the images keep the very rows one process would (see `merge`)."""

    def __init__(self, keep: int | None = 10_000, seed: int = 0, total: int | None = None) -> None:
        self.keep, self.n = keep, 0
        self.sum = self.outer = None
        self.subset: list[Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.chosen: set[int] | None = None
        self.rows: dict[int, Tensor] = {}
        if total is not None:
            pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
            self.chosen = set(pick[: total if keep is None else keep].tolist())

    def update(self, feats: Tensor, indices: Sequence[int] | None = None) -> None:
        f = feats.detach().double().cpu()
        if self.sum is None:
            self.sum, self.outer = f.sum(0), f.T @ f
        else:
            self.sum += f.sum(0)
            self.outer += f.T @ f
        f32 = f.float()
        if self.chosen is not None:
            self.n += len(f)
            self.rows.update((i, row) for i, row in zip(indices, f32) if i in self.chosen)
            return
        if self.keep is None or self.keep == 0:  # every row, or none
            self.n += len(f)
            self.subset.extend(f32 if self.keep is None else [])
            return
        for row in f32:  # reservoir sampling: every row kept with equal probability
            self.n += 1
            if len(self.subset) < self.keep:
                self.subset.append(row)
            else:
                j = int(torch.randint(self.n, (1,), generator=self.gen))
                if j < self.keep:
                    self.subset[j] = row

    def shares(self) -> dict:
        """What another process needs to merge this one's share (picklable)."""
        return {"n": self.n, "sum": self.sum, "outer": self.outer, "rows": self.rows}

    def merge(self, shares: list[dict]) -> None:
        """Every process's share (this one's included) -> the statistics of all images; the
        sums are added in rank order, the KID rows put in index order."""
        self.n = sum(s["n"] for s in shares)
        self.sum = sum(s["sum"] for s in shares if s["sum"] is not None)
        self.outer = sum(s["outer"] for s in shares if s["outer"] is not None)
        self.rows = {i: r for s in shares for i, r in s["rows"].items()}

    def stats(self, evaluator: str, source: str = "") -> FeatureStats:
        if self.n < 2:
            raise DataError(f"need at least 2 images for statistics, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        rows = [self.rows[i] for i in sorted(self.rows)] if self.chosen is not None else self.subset
        subset = torch.stack(rows).numpy() if rows else np.zeros((0, len(mu)), np.float32)
        return FeatureStats(evaluator, self.n, mu.numpy(), sigma.numpy(), subset, source)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½) (Heusel et al. 2017)."""
    from scipy import linalg

    diff = a.mu - b.mu
    with warnings.catch_warnings(record=True) as caught:  # scipy warns on a singular product
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if caught or not np.isfinite(covmean).all():  # near-singular: regularise as pytorch-fid
        eps = np.eye(a.sigma.shape[0]) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((a.sigma + eps) @ (b.sigma + eps))
    covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def kernel_distance(
    a: FeatureStats, b: FeatureStats, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """KID (polynomial-kernel MMD², Bińkowski et al. 2018) by torchmetrics on the kept rows."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(a.subset), len(b.subset))
    if size < 2:
        raise DataError("KID needs at least 2 images on each side")
    # sync_on_compute=False: under torchrun the features are merged already (merge_shares);
    # torchmetrics would gather them from every rank once more
    kid = KernelInceptionDistance(
        feature=_Identity(a.subset.shape[1]),
        subsets=subsets,
        subset_size=size,
        sync_on_compute=False,
    )
    kid.update(torch.from_numpy(a.subset), real=True)
    kid.update(torch.from_numpy(b.subset), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG: fix them,
        torch.manual_seed(0)  # so that the score depends on the features alone
        mean, std = kid.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E KL(p(y|x) || p(y))) over `splits` chunks, as torchmetrics / the paper."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(
        feature=_Identity(logits.shape[1]), splits=splits, sync_on_compute=False
    )  # the logits are every rank's already
    metric.update(logits.float())
    with torch.random.fork_rng(devices=[]):  # it shuffles with the global RNG: fix it
        torch.manual_seed(0)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score_adm(logits: Tensor, split_size: int = 5000) -> float:
    """IS as the ADM evaluator computes it: softmax, then exp(mean KL) over consecutive
    chunks of `split_size` (no shuffle), averaged."""
    p = torch.softmax(logits.double(), 1)
    scores = []
    for part in p.split(split_size):
        kl = (part * (part.log() - part.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


class _Accumulators:
    """Pool features, spatial features (sums only) and logits of one image stream."""

    def __init__(self, keep: int | None, total: int | None) -> None:
        self.pool = StatsAccumulator(keep, total=total)
        self.spatial = StatsAccumulator(0, total=total)
        self.logits: list[Tensor] = []
        self.seen: list[int] = []
        self.has_spatial = False

    def update(self, out: dict, indices: Sequence[int] | None = None) -> None:
        self.pool.update(out["pool"], indices)
        if "spatial" in out:
            self.has_spatial = True
            self.spatial.update(out["spatial"], indices)
        if "logits" in out:
            self.logits.append(out["logits"].float().cpu())  # 50k × 1008 fp32: 200 MB
            self.seen.extend(indices or [])


def stats_of(
    images: Iterable[Tensor],
    evaluator: Evaluator,
    keep: int | None = 10_000,
    source: str = "",
    with_logits: bool = False,
) -> tuple[FeatureStats, Tensor | None]:
    """Feature statistics of an iterable of [-1, 1] image batches (and their logits)."""
    acc = _Accumulators(keep, None)
    for batch in images:
        acc.update(evaluator.outputs(batch, with_logits))
    stats = acc.pool.stats(evaluator.name, source)
    if acc.has_spatial:
        spatial = acc.spatial.stats(evaluator.name)
        stats.mu_s, stats.sigma_s = spatial.mu, spatial.sigma
    return stats, (torch.cat(acc.logits) if acc.logits else None)


def share_stats(
    images: Iterable[tuple[list[int], Tensor]],
    evaluator: Evaluator,
    total: int,
    keep: int | None = 10_000,
    with_logits: bool = False,
) -> dict:
    """One process's share of `total` numbered images ((indices, batch) pairs, e.g. one
    torchrun rank's): its sums, kept rows and logits, to be merged by `merge_shares`."""
    acc = _Accumulators(keep, total)
    for indices, batch in images:
        acc.update(evaluator.outputs(batch, with_logits), indices)
    return {
        "acc": acc.pool.shares(),
        "spatial": acc.spatial.shares() if acc.has_spatial else None,
        "seen": acc.seen,
        "logits": torch.cat(acc.logits) if acc.logits else None,
    }


def merge_shares(
    shares: list[dict],
    evaluator: Evaluator,
    total: int,
    keep: int | None = 10_000,
    source: str = "",
) -> tuple[FeatureStats, Tensor | None]:
    """Every process's share -> the statistics of all images and their logits in index
    order: what one process computes over them all, up to the order of float64 sums."""
    acc = StatsAccumulator(keep, total=total)
    acc.merge([s["acc"] for s in shares])
    stats = acc.stats(evaluator.name, source)
    if any(s["spatial"] is not None for s in shares):
        spatial = StatsAccumulator(0, total=total)
        spatial.merge([s["spatial"] for s in shares if s["spatial"] is not None])
        merged = spatial.stats(evaluator.name)
        stats.mu_s, stats.sigma_s = merged.mu, merged.sigma
    logits = None
    if any(s["logits"] is not None for s in shares):
        order = torch.tensor([i for s in shares for i in s["seen"]]).argsort()
        logits = torch.cat([s["logits"] for s in shares if s["logits"] is not None])[order]
    return stats, logits


def save_features(path: str | Path, ref: FeatureStats, fake: FeatureStats, result: dict) -> None:
    """The features behind every score (all rows of both sides) and both sides'
    statistics, with the scores and the protocol as JSON, so anyone can recompute them."""
    arrays = {"sample_features": fake.subset, "ref_features": ref.subset}
    for side, st in (("sample", fake), ("ref", ref)):
        arrays.update({f"{side}_mu": st.mu, f"{side}_sigma": st.sigma})
        if st.mu_s is not None:
            arrays.update({f"{side}_mu_s": st.mu_s, f"{side}_sigma_s": st.sigma_s})
    meta = {k: v for k, v in result.items() if not k.startswith("_")}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, scores=json.dumps(meta, default=str))

    atomic_write(Path(path), write, needed_bytes=sum(a.nbytes for a in arrays.values()))
