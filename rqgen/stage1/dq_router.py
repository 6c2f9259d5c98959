"""DQ-VAE's entropy granularity router: a region gets fine codes when its pixels carry more
information than a threshold fitted on training images for a target fine fraction r.

Per coarse region: grayscale pixels in [-1, 1] -> soft 32-bin histogram (each pixel splits its
weight between the two nearest bin centres) -> Shannon entropy. The threshold is the (1 − r)
quantile of the training regions' entropies, so a fraction r of them is fine. The reference
code computed its thresholds over the wrong pixel range (its issue #7); the range here is the
one the images are in, [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from rqgen.errors import ConfigError, DataError
from rqgen.stage1.blocks import Normalize


def region_entropy(images: Tensor, coarse_size: int, bins: int = 32) -> Tensor:
    """(B, 3, R, R) in [-1, 1] -> entropy in nats of each coarse region, (B, Hc, Hc)."""
    B, _, R, _ = images.shape
    if R % coarse_size:
        raise ConfigError(f"resolution {R} is not divisible by the coarse grid {coarse_size}")
    p = R // coarse_size
    gray = images.float().clamp(-1, 1).mean(1)  # (B, R, R)
    patches = gray.unfold(1, p, p).unfold(2, p, p).reshape(B, coarse_size, coarse_size, p * p)
    x = (patches + 1) / 2 * (bins - 1)  # bin coordinate in [0, bins - 1]
    lo = x.floor().clamp(max=bins - 2)
    w_hi = x - lo  # linear split between bins lo and lo + 1
    hist = torch.zeros(B, coarse_size, coarse_size, bins, device=images.device)
    hist.scatter_add_(-1, lo.long(), 1 - w_hi)
    hist.scatter_add_(-1, lo.long() + 1, w_hi)
    prob = hist / hist.sum(-1, keepdim=True)
    return -(prob * prob.clamp_min(1e-12).log()).sum(-1)


class EntropyRouter(nn.Module):
    """fine_mask = region_entropy(x) > threshold; `fit` sets the threshold for fraction r."""

    def __init__(self, coarse_size: int, fine_fraction: float = 0.5, bins: int = 32) -> None:
        super().__init__()
        if not 0 <= fine_fraction <= 1:
            raise ConfigError(f"fine fraction must be in [0, 1], got {fine_fraction}")
        self.coarse_size, self.fine_fraction, self.bins = coarse_size, fine_fraction, bins
        self.register_buffer("threshold", torch.tensor(float("nan")))

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> float:
        """Threshold from training images (an iterable of (B, 3, R, R) batches)."""
        ents = [region_entropy(x, self.coarse_size, self.bins).flatten() for x in batches]
        if not ents:
            raise DataError("no images to fit the entropy router on")
        e = torch.cat(ents)
        # the (1 - r) quantile: a fraction r of training regions lies above it
        self.threshold.fill_(float(torch.quantile(e.double(), 1 - self.fine_fraction)))
        return float(self.threshold)

    def forward(self, images: Tensor) -> Tensor:
        if torch.isnan(self.threshold):
            raise ConfigError("the entropy router has no threshold: call fit() on training data")
        return region_entropy(images, self.coarse_size, self.bins) > self.threshold


class LearnedRouter(nn.Module):
    """DQ-VAE's learned router: per coarse region, an MLP on [GN(coarse), GN(avgpool2(fine))]
    gives two logits (coarse, fine). Training draws a hard Gumbel-softmax sample (τ = 1) whose
    gradient flows straight through; the budget loss γ·(mean fine fraction − r)² keeps the
    fraction of those samples near the target r.

    Evaluation does not take the argmax: the budget holds the *sampled* fraction at r, and
    with Gumbel noise that is met by logit margins mostly below 0, so an argmax makes almost
    every held-out region coarse (measured: fine fraction ≤ 0.001 for r = 1/3). Instead a
    region is fine when its margin (fine − coarse logit) is above `eval_threshold`, a running
    (1 − r)-quantile of the training margins (EMA 0.9: they move as the router learns),
    averaged over ranks: held-out fractions then follow r."""

    def __init__(
        self,
        coarse_channels: int,
        fine_channels: int,
        fine_fraction: float = 0.5,
        budget_weight: float = 10.0,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= fine_fraction <= 1:
            raise ConfigError(f"fine fraction must be in [0, 1], got {fine_fraction}")
        self.fine_fraction, self.budget_weight = fine_fraction, budget_weight
        self.norm_coarse, self.norm_fine = Normalize(coarse_channels), Normalize(fine_channels)
        width = coarse_channels + fine_channels
        hidden = hidden or width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.register_buffer("eval_threshold", torch.tensor(float("nan")))

    def logits(self, h_coarse: Tensor, h_fine: Tensor) -> Tensor:
        """(B, Cc, Hc, Hc), (B, Cf, 2Hc, 2Hc) -> (B, Hc, Hc, 2) logits of (coarse, fine)."""
        pooled = nn.functional.avg_pool2d(self.norm_fine(h_fine), 2)
        x = torch.cat([self.norm_coarse(h_coarse), pooled], 1).permute(0, 2, 3, 1)
        return self.mlp(x)

    def forward(self, h_coarse: Tensor, h_fine: Tensor) -> tuple[Tensor, Tensor]:
        """-> (gate (B, Hc, Hc): 1 fine / 0 coarse, differentiable in training; budget loss)."""
        logits = self.logits(h_coarse, h_fine)
        margin = (logits[..., 1] - logits[..., 0]).float()
        if self.training:
            gate = nn.functional.gumbel_softmax(logits.float(), tau=1.0, hard=True)[..., 1]
            self._track_threshold(margin.detach())
        elif torch.isfinite(self.eval_threshold):
            gate = (margin > self.eval_threshold).float()
        else:  # a router trained before the threshold existed
            gate = (margin > 0).float()
        budget = self.budget_weight * (gate.mean() - self.fine_fraction) ** 2
        return gate, budget

    @torch.no_grad()
    def _track_threshold(self, margin: Tensor, decay: float = 0.9) -> None:
        q = torch.quantile(margin.flatten(), 1.0 - self.fine_fraction)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(q)  # every rank holds the same threshold
            q /= torch.distributed.get_world_size()
        t = self.eval_threshold
        t.copy_(q if torch.isnan(t) else decay * t + (1 - decay) * q)
