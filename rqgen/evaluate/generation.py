"""Generation metrics: FID, KID and Inception Score of a sample set against a reference.

An `Evaluator` maps [-1, 1] images to features (and, when it can, class logits for IS):
`inception` is torch-fidelity's InceptionV3 (2015-12-05 weights, from a local file; the
network behind most published FIDs), `digits` is the digit classifier trained on the bundled
digits (runs anywhere, meaningful only for digits). Any module can stand in (tests use small
ones). Statistics stream: features are summed in float64 batch by batch, and only a random
subset of rows (default 10,000) is kept for KID.

Reference statistics are saved as `.npz` (`rqgen fid-stats`) with the evaluator's name, and a
comparison between different evaluators is refused.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.errors import CheckpointError, ConfigError, DataError
from rqgen.evaluate.digits import DigitFeatures, load_or_train
from rqgen.evaluate.fid import _Precomputed as _Identity  # features already computed
from rqgen.evaluate.fid import find_inception_weights, inception_fid_available
from rqgen.utils.files import atomic_write
from rqgen.utils.paths import cache_dir


class Evaluator(nn.Module):
    """features(images) -> (B, F) and, if `has_logits`, logits(images) -> (B, classes)."""

    def __init__(
        self,
        name: str,
        features: nn.Module,
        logits: nn.Module | None = None,
        input_size: int | None = None,
        short: str = "",
    ) -> None:
        super().__init__()
        self.name, self.feature_net, self.logit_net = name, features.eval(), logits
        self.input_size = input_size  # resize to this many pixels first (None: as given)
        self.short = short  # inception, digits: names the scores

    def score_names(self) -> dict[str, str]:
        """Result keys: the standard FID / KID / IS only for Inception features; in another
        network's feature space the same formulas get that network's name (fd_digits ...),
        so that no one quotes a digit-classifier distance as an FID."""
        if self.short == "inception":
            return {"fd": "fid", "kd": "kid", "is": "inception_score", "label": "FID"}
        s = self.short or "features"
        return {"fd": f"fd_{s}", "kd": f"kd_{s}", "is": f"is_{s}", "label": f"FD({s})"}

    @property
    def has_logits(self) -> bool:
        return self.logit_net is not None

    def _prepare(self, images: Tensor) -> Tensor:
        p = next(self.parameters(), None)
        images = images.to(p.device if p is not None else "cpu", torch.float32)
        if self.input_size and images.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return images

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.feature_net(self._prepare(images)).flatten(1).double()

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        return self.logit_net(self._prepare(images)).double()


class _Uint8Inception(nn.Module):
    """[-1, 1] -> uint8 [0, 255] (rounded) -> torch-fidelity InceptionV3 output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def build_evaluator(name: str, device="cpu", cache: str | Path | None = None) -> Evaluator:
    """`inception` (local torch-fidelity weights) or `digits` (the bundled-digits CNN)."""
    if name == "digits":
        clf = load_or_train(Path(cache or cache_dir()) / "classifiers", device)
        name = "digits-cnn (rqgen bundled-digits classifier, 128-d)"
        return Evaluator(name, DigitFeatures(clf), clf, input_size=32, short="digits").to(device)
    if name == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3

        ok, reason = inception_fid_available()
        if not ok:
            raise CheckpointError(reason)
        path = str(find_inception_weights())
        feats = NoTrainInceptionV3("inception-v3-compat", ["2048"], path)
        logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], path)
        return Evaluator(
            "torch-fidelity InceptionV3 2015-12-05 (pool3 2048-d)",
            _Uint8Inception(feats),
            _Uint8Inception(logits),
            short="inception",
        ).to(device)
    raise ConfigError(f"unknown evaluator {name!r}: use inception or digits")


def digits_like(images: Tensor) -> float:
    """Fraction of images (B, 3, H, W) in [-1, 1] that look like the bundled digits: grey
    (channels within 0.05 of their mean on average) and mostly dark (median below 0.35 of
    full brightness), as white strokes on black are."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    grey = (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3)) < 0.05
    dark = x.flatten(1).median(1).values < 0.35
    return float((grey & dark).float().mean())


def check_digits_like(batches: Iterable[Tensor], what: str, look: int = 64):
    """Pass batches through; refuse in one line when the first `look` images are mostly not
    digit-like, since a digit classifier's features say nothing about other pictures."""
    batches = iter(batches)
    head, n = [], 0
    for batch in batches:
        head.append(batch)
        n += len(batch)
        if n >= look:
            break
    frac = digits_like(torch.cat(head)[:look]) if head else 1.0
    if frac < 0.5:
        raise DataError(
            f"--features digits scores pictures with a classifier of white-on-black digits, but "
            f"only {frac:.0%} of the first images of {what} look like that: its distances would "
            "mean nothing there; use --features inception"
        )
    yield from head
    yield from batches


@dataclass
class FeatureStats:
    """Mean and covariance of one image set's features, plus a random subset for KID."""

    evaluator: str
    n: int
    mu: np.ndarray
    sigma: np.ndarray
    subset: np.ndarray
    source: str = ""

    def save(self, path: str | Path) -> Path:
        path = Path(path)

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
                )

        atomic_write(path, write, needed_bytes=self.sigma.nbytes + self.subset.nbytes)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        try:
            # our own handle: numpy leaves its file open when the zip is corrupt
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                return cls(
                    str(z["evaluator"]),
                    int(z["n"]),
                    z["mu"],
                    z["sigma"],
                    z["subset"].astype(np.float64),
                    str(z["source"]),
                )
        except (OSError, KeyError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as e:
            raise DataError(f"'{path}' is not a statistics file written by rqgen fid-stats") from e


class StatsAccumulator:
    """Streams feature batches: float64 sums for mean/covariance, and a subset of rows for
    KID. Without `total` the subset is a reservoir sample; with `total` (the number of images,
    known up front, numbered 0..total-1) it is a seeded choice of indices, so that processes
    sharing the images keep the very rows one process would (see `merge`)."""

    def __init__(self, keep: int = 10_000, seed: int = 0, total: int | None = None) -> None:
        self.keep, self.n = keep, 0
        self.sum = self.outer = None
        self.subset: list[Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)
        self.chosen: set[int] | None = None
        self.rows: dict[int, Tensor] = {}
        if total is not None:
            pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep]
            self.chosen = set(pick.tolist())

    def update(self, feats: Tensor, indices: Sequence[int] | None = None) -> None:
        f = feats.detach().double().cpu()
        if self.sum is None:
            self.sum, self.outer = f.sum(0), f.T @ f
        else:
            self.sum += f.sum(0)
            self.outer += f.T @ f
        if self.chosen is not None:
            self.n += len(f)
            self.rows.update((i, row) for i, row in zip(indices, f) if i in self.chosen)
            return
        for row in f:  # reservoir sampling: every row kept with equal probability
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
        subset = torch.stack(rows).numpy()
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


def stats_of(
    images: Iterable[Tensor],
    evaluator: Evaluator,
    keep: int = 10_000,
    source: str = "",
    with_logits: bool = False,
) -> tuple[FeatureStats, Tensor | None]:
    """Feature statistics of an iterable of [-1, 1] image batches (and their logits)."""
    acc, logits = StatsAccumulator(keep), []
    for batch in images:
        acc.update(evaluator.features(batch))
        if with_logits and evaluator.has_logits:
            logits.append(evaluator.logits(batch).float().cpu())  # 50k × 1008 fp32: 200 MB
    return acc.stats(evaluator.name, source), (torch.cat(logits) if logits else None)


def share_stats(
    images: Iterable[tuple[list[int], Tensor]],
    evaluator: Evaluator,
    total: int,
    keep: int = 10_000,
    with_logits: bool = False,
) -> dict:
    """One process's share of `total` numbered images ((indices, batch) pairs, e.g. one
    torchrun rank's): its sums, KID rows and logits, to be merged by `merge_shares`."""
    acc, logits, seen = StatsAccumulator(keep, total=total), [], []
    for indices, batch in images:
        acc.update(evaluator.features(batch), indices)
        if with_logits and evaluator.has_logits:
            logits.append(evaluator.logits(batch).float().cpu())
            seen.extend(indices)
    return {"acc": acc.shares(), "seen": seen, "logits": torch.cat(logits) if logits else None}


def merge_shares(
    shares: list[dict], evaluator: Evaluator, total: int, keep: int = 10_000, source: str = ""
) -> tuple[FeatureStats, Tensor | None]:
    """Every process's share -> the statistics of all images and their logits in index
    order: what one process computes over them all, up to the order of float64 sums."""
    acc = StatsAccumulator(keep, total=total)
    acc.merge([s["acc"] for s in shares])
    logits = None
    if any(s["logits"] is not None for s in shares):
        order = torch.tensor([i for s in shares for i in s["seen"]]).argsort()
        logits = torch.cat([s["logits"] for s in shares if s["logits"] is not None])[order]
    return acc.stats(evaluator.name, source), logits
