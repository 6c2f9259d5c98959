"""Residual quantization (RQ-VAE paper, Eq. 3-5, 7 and 15), usable in any model.

    r_0 = z;  k_d = argmin_k ||r_{d-1} - e(k)||²;  r_d = r_{d-1} - e(k_d)        (Eq. 3-4)
    Ẑ(d) = Σ_{d'≤d} e(k_{d'})   (partial sums);   Ẑ = Ẑ(D)                        (Eq. 5)

Design choices, and why:
- One codebook shared by all depths by default (as in the paper); `shared_codebook=False`
  gives D separate codebooks for the C.3 ablation. Codebooks are buffers of shape
  (num_codebooks, K, dim) trained by EMA, not by gradient.
- EMA statistics are gathered over ALL depths of a forward pass and applied ONCE. The
  official code updates the codebook between depths, so a train-mode forward quantizes
  deeper residuals with a codebook that has already moved towards them; eval-mode
  reconstructions are then worse than training suggests. `decay` is per depth, as there:
  a shared codebook sees D batches of residuals per forward, so its one pooled update decays
  by decay**D (the official code decays D times). With decay**1 instead, the codebook
  learned 4x slower at D = 4 and ended 3-5% worse in relative MSE than ResidualVQ's
  (benchmarks/results/quantizer_speed.md).
- Under torch.distributed the statistics are summed over ranks with one all-reduce and the
  random choices (data init, restarts) are made on rank 0 and broadcast, so every rank holds
  the same codebook after every step, equal to a single process on the global batch.
- `depth_scale=True` (not in the paper): the residual entering depth d is divided by a
  per-depth scale s_d before the lookup and the code multiplied back, e(k_d) = s_d·c(k_d),
  s_d an EMA of the mean norm of r_{d-1}. Residuals shrink with depth, so without it most of
  a shared codebook sits at the depth-1 scale and the deeper depths choose among a few small
  codes. `code_table()` gives the per-depth vectors s_d·c(k) that stage 2 embeds.
- The nearest-code search runs in fp32 even under bf16 autocast (distances between nearby
  codes underflow bf16's 8-bit mantissa) and is chunked over rows so that N×K distances are
  never materialised at once (K = 16384 with millions of vectors would need tens of GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.quantize import distributed as dist
from rqgen.quantize.estimators import ESTIMATORS
from rqgen.utils.device import exact_fp32


@dataclass
class QuantizerOutput:
    quantized: Tensor  # Ẑ with a straight-through gradient to z, same shape and dtype as z
    codes: Tensor  # (..., D) int64 code map M
    commitment_loss: Tensor  # β · Σ_d ||z - sg[Ẑ(d)]||² (Eq. 7), a scalar


class ResidualQuantizer(nn.Module):
    """Residual vector quantizer with EMA codebook(s) and dead-code restarts.

    Input vectors are the last axis of z: (..., dim). Codes come back as (..., depth).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        *,
        shared_codebook: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        restart_unused_codes: bool = True,
        restart_threshold: float = 1.0,
        init_from_data: bool = True,
        max_distance_elements: int = 1 << 19,
        min_rows: int = 256,
        gradient_estimator: str = "ste",
        depth_scale: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"need depth >= 1, codebook_size >= 2, dim >= 1; got {depth=}")
        if gradient_estimator not in ESTIMATORS:
            raise ValueError(f"gradient_estimator={gradient_estimator!r}: use ste or rotation")
        self.gradient_estimator = gradient_estimator
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps = decay, eps
        self.commitment_weight = commitment_weight
        self.restart_unused_codes = restart_unused_codes
        self.restart_threshold = restart_threshold
        self.init_from_data = init_from_data
        self.max_distance_elements, self.min_rows = max_distance_elements, min_rows

        n = 1 if shared_codebook else depth
        codebook = torch.randn(n, codebook_size, dim) / dim**0.5
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(n, codebook_size))  # EMA of counts
        self.register_buffer("embed_sum", codebook.clone())  # EMA of assigned vector sums
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        self.depth_scale = depth_scale
        if depth_scale:  # only then in the state dict: unscaled checkpoints keep their keys
            self.register_buffer("scale", torch.ones(depth))

    _known_initialized = False  # `initialized` as last read on the host
    frozen = False  # True: the codebook stays as it is (no EMA update, no restart) in training

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_initialized = False  # a loaded state may be uninitialised
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def num_codebooks(self) -> int:
        return self.codebook.shape[0]

    def codebook_index(self, d: int) -> int:
        """Which codebook serves depth d (0-based)."""
        return 0 if self.shared_codebook else d

    def scale_at(self, d: int) -> Tensor | float:
        """s_d: what the residual entering depth d (0-based) is divided by for the lookup."""
        return self.scale[d] if self.depth_scale else 1.0

    def code_table(self) -> Tensor:
        """The code vectors e(k) each depth adds, (1 or D, K, dim): the codebook itself, or
        with `depth_scale` one scaled copy s_d·c(k) per depth (what stage 2 embeds)."""
        if not self.depth_scale:
            return self.codebook
        cb = self.codebook[[self.codebook_index(d) for d in range(self.depth)]]
        return cb * self.scale[:, None, None]

    @property
    def shared_table(self) -> bool:
        """Whether one table of code_table() serves every depth."""
        return self.shared_codebook and not self.depth_scale

    # ----------------------------------------------------------------- search (Eq. 3)
    def _search(self, x: Tensor, c: int, tau: float | None, generator) -> Tensor:
        """Nearest code of each row of x (N, dim) in codebook c; or a sample from Q_τ. In
        full fp32 (no TF32), so a GPU picks the codes a CPU does."""
        if torch.compiler.is_compiling():
            return self._search_chunks(x, c, tau, generator)
        with exact_fp32():
            return self._search_chunks(x, c, tau, generator)

    def _search_chunks(self, x: Tensor, c: int, tau: float | None, generator) -> Tensor:
        cb = self.codebook[c]
        cb_sq = cb.pow(2).sum(1)
        # Chunks of ~2 MB of distances stay in cache between the matmul that writes them and
        # the argmin that reads them (faster than one large block: benchmarks/results/
        # design_notes.md), but never fewer than min_rows rows: each chunk reads the whole
        # codebook again.
        rows = max(self.min_rows, self.max_distance_elements // self.codebook_size)
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

    def _residual_quantize(
        self,
        x: Tensor,
        tau: float | Sequence[float] | None = None,
        generator=None,
        depth: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. 3-5 on flat fp32 rows, for the first `depth` depths (default D). Returns codes
        (N, D), partial sums Ẑ(1..D) (D, N, dim) and the residuals r_0..r_{D-1} (D, N, dim)
        that each depth quantized. With a depth scale the lookup sees r / s_d, whose distances
        are ||r - e(k)||² / s_d²: τ is divided by s_d² so that Q_τ stays the same (Eq. 15)."""
        codes, partials, residuals = [], [], []
        r, zhat = x, torch.zeros_like(x)
        for d in range(self.depth if depth is None else depth):
            c, s, t = self.codebook_index(d), self.scale_at(d), _at_depth(tau, d)
            t = None if t is None or t <= 0 else t / s**2
            k = self._search(r / s if self.depth_scale else r, c, t, generator)
            e = F.embedding(k, self.codebook[c]) * s
            residuals.append(r)
            codes.append(k)
            r = r - e
            zhat = zhat + e
            partials.append(zhat)
        return torch.stack(codes, -1), torch.stack(partials), torch.stack(residuals)

    # ---------------------------------------------------------------------- forward
    def forward(
        self, z: Tensor, weights: Tensor | None = None, depths: Tensor | None = None
    ) -> QuantizerOutput:
        """Quantize z (..., dim). In training mode also updates the codebook (once).

        `weights` (..., broadcastable to z's leading shape) weigh each vector in the
        commitment loss and in the EMA statistics: DQ-VAE gives each of the four fine-grid
        copies of a coarse code 1/4, so every region counts once. `depths` (1..D,
        broadcastable to the leading shape) ends each vector's stack early: its quantized
        output is the partial sum Ẑ(d) (quantizer dropout); codes, commitment and the
        codebook update still see every depth."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(z.shape)}")
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = z.float().reshape(-1, self.dim)
            w = None
            if weights is not None:
                w = weights.detach().float().expand(lead).reshape(-1)
            with torch.no_grad():
                if self.training and not self._known_initialized:  # read once, not per step
                    if not bool(self.initialized):
                        self._init_codebook(zf.detach())
                    self._known_initialized = True
                codes, partials, residuals = self._residual_quantize(zf.detach())
            # Eq. 7: commitment to every partial sum, summed over depths.
            if w is None:
                commit = sum(F.mse_loss(zf, partials[d]) for d in range(self.depth))
            else:  # weighted mean over vectors, mean over channels
                commit = sum(
                    ((zf - partials[d]).pow(2).mean(-1) * w).sum() / w.sum().clamp_min(1e-12)
                    for d in range(self.depth)
                )
            zhat = partials[-1]
            if depths is not None:  # Ẑ(d) of each vector's own depth d
                d = depths.to(device=zf.device, dtype=torch.long).expand(lead).reshape(1, -1, 1)
                zhat = partials.gather(0, (d - 1).expand(1, -1, self.dim))[0]
            quantized = ESTIMATORS[self.gradient_estimator](zf, zhat)
            if self.training and not self.frozen:
                with torch.no_grad():
                    self._ema_update(residuals, codes, w)
        return QuantizerOutput(
            quantized=quantized.reshape(*lead, self.dim).to(z.dtype),
            codes=codes.reshape(*lead, self.depth),
            commitment_loss=self.commitment_weight * commit,
        )

    @torch.no_grad()
    def quantize(
        self,
        z: Tensor,
        tau: float | Sequence[float] | None = None,
        generator: torch.Generator | None = None,
        depth: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Codes (..., D) and the residuals r_{d-1} (..., D, dim) they were chosen from; with
        `depth`, only the first `depth` of them (a prefix costs only its own lookups).

        Pure: never updates the codebook. With `tau` (one value, or one per depth), each code
        is drawn from Q_τ(· | r_{d-1}) instead of taken as the argmin (stochastic sampling,
        Eq. 15); later residuals follow the drawn codes.
        """
        lead = z.shape[:-1]
        with torch.autocast(device_type=z.device.type, enabled=False):
            codes, _, residuals = self._residual_quantize(
                z.float().reshape(-1, self.dim), tau, generator, depth
            )
        n = codes.shape[-1]
        return codes.reshape(*lead, n), residuals.permute(1, 0, 2).reshape(*lead, n, self.dim)

    @torch.no_grad()
    def quantization_error(self, z: Tensor) -> Tensor:
        """Per depth d, the mean over vectors of ||r_d||² = ||r_{d-1} - e(k_d)||² (argmin
        codes): the scale of the distances Q_τ compares at depth d+1. (D,) float32."""
        codes, residuals = self.quantize(z)
        left = residuals - self.embed(codes)  # r_d for d = 1..D
        return left.pow(2).sum(-1).reshape(-1, self.depth).mean(0)

    # ------------------------------------------------------------ codes -> vectors
    def embed(self, codes: Tensor) -> Tensor:
        """Per-depth code vectors e(k_d): (..., D') -> (..., D', dim), for any D' ≤ D."""
        if self.shared_table:
            return F.embedding(codes, self.codebook[0])
        table = self.code_table()
        return torch.stack(
            [F.embedding(codes[..., d], table[d]) for d in range(codes.shape[-1])], -2
        )

    def partial_sums(self, codes: Tensor) -> Tensor:
        """Ẑ(1..D') for codes (..., D'): (..., D', dim), Eq. 5."""
        return self.embed(codes).cumsum(-2)

    def decode_codes(self, codes: Tensor, depth: int | None = None) -> Tensor:
        """Ẑ(depth) = Σ_{d ≤ depth} e(k_d) (default: all D depths) -> (..., dim)."""
        depth = codes.shape[-1] if depth is None else depth
        if not 1 <= depth <= codes.shape[-1]:
            raise ValueError(f"depth must be in 1..{codes.shape[-1]}, got {depth}")
        return self.embed(codes[..., :depth]).sum(-2)

    def soft_labels(self, residual: Tensor, depth: int, tau: float) -> Tensor:
        """Q_τ(k | r) ∝ exp(-||r - e(k)||² / τ) over the codebook of `depth` (0-based), Eq. 15.

        residual: (..., dim) -> probabilities (..., K). Builds the full (..., K) output, so
        call it on stage-2 sized batches, not on millions of vectors at once.
        """
        cb = self.code_table()[0 if self.shared_table else depth]
        with torch.autocast(device_type=residual.device.type, enabled=False):
            r = residual.float()
            dist = (r.pow(2).sum(-1, keepdim=True) - 2 * r @ cb.t()) + cb.pow(2).sum(-1)
            return torch.softmax(-dist / tau, dim=-1)

    # ------------------------------------------------------------------ codebook
    def _pool(self, residuals: Tensor, c: int) -> Tensor:
        """Vectors that codebook c quantized this step: all depths if shared, else depth c.

        Rows are ordered sample-major, so that under DDP the ranks' pools laid end to end
        are the single-process pool of the global batch (see distributed.random_rows)."""
        if self.shared_codebook:
            return residuals.transpose(0, 1).reshape(-1, self.dim)
        return residuals[c]

    @torch.no_grad()
    def _init_codebook(self, z: Tensor) -> None:
        """Data-dependent init: codebook d from random residuals r_{d-1} of the first batch
        (with a depth scale: divided by s_d, each s_d the mean norm of r_{d-1})."""
        r = z
        for d in range(self.depth if self.depth_scale else self.num_codebooks):
            c = self.codebook_index(d)
            if self.depth_scale:
                self.scale[d] = dist.mean_norm(r).clamp_min(self.eps)
            x = r / self.scale_at(d)
            if d == c:  # the first depth a codebook serves: drawn from its residuals
                vectors = dist.random_rows(x, self.codebook_size)
                self.codebook[c] = vectors
                self.embed_sum[c] = vectors
                self.cluster_size[c] = 1.0
            if d + 1 < self.depth and (self.depth_scale or not self.shared_codebook):
                k = self._search(x, c, None, None)  # the next depth sees this one's residuals
                r = r - F.embedding(k, self.codebook[c]) * self.scale_at(d)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, residuals: Tensor, codes: Tensor, w: Tensor | None = None) -> None:
        """One EMA step from this forward's assignments over all depths (with restarts);
        `w` (N,) weighs each vector's contribution to counts and sums. With a depth scale
        the codebook learns from r_{d-1} / s_d, the vectors its lookup saw, and then s_d
        moves towards this step's mean norm of r_{d-1}."""
        n_cb, K = self.num_codebooks, self.codebook_size
        if self.depth_scale:
            norms = torch.stack([dist.mean_norm(r, w) for r in residuals])
            residuals = residuals / self.scale[:, None, None]
        weighted = residuals if w is None else residuals * w[None, :, None]
        if w is None:
            ones = torch.ones_like(codes, dtype=torch.float)
        else:
            ones = w[:, None].expand(-1, self.depth)
        # counts and sums packed in one tensor: a single all-reduce per step.
        stats = torch.zeros(n_cb, K, self.dim + 1, device=codes.device)
        if self.shared_codebook:  # one scatter over all depths at once
            k = codes.t().reshape(-1)
            stats[0, :, :-1].index_add_(0, k, weighted.reshape(-1, self.dim))
            stats[0, :, -1] = torch.bincount(k, ones.t().reshape(-1), minlength=K).float()
        else:
            for d in range(self.depth):
                stats[d, :, :-1].index_add_(0, codes[:, d], weighted[d])
                stats[d, :, -1] = torch.bincount(codes[:, d], ones[:, d], minlength=K).float()
        dist.all_reduce_sum(stats)
        sums, counts = stats[..., :-1], stats[..., -1]

        # one update stands for the D updates of a per-depth EMA when the codebook is shared
        decay = self.decay ** (self.depth if self.shared_codebook else 1)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.cluster_size.sum(-1, keepdim=True)
        size = (self.cluster_size + self.eps) / (n + K * self.eps) * n
        self.codebook.copy_(self.embed_sum / size.unsqueeze(-1))

        if self.restart_unused_codes:
            self._restart_dead_codes(residuals)
        if self.depth_scale:
            self.scale.mul_(self.decay).add_(norms.clamp_min(self.eps), alpha=1 - self.decay)

    @torch.no_grad()
    def _restart_dead_codes(self, residuals: Tensor) -> None:
        """Jukebox-style restarts: codes whose EMA usage fell below the threshold are moved
        onto random vectors of this step. cluster_size is identical on all ranks (it was
        all-reduced), so all ranks agree on which codes are dead. Every code draws a
        candidate and only the dead ones take it: no count is read back from the device."""
        for c in range(self.num_codebooks):
            dead = (self.cluster_size[c] < self.restart_threshold)[:, None]
            vectors = dist.random_rows(self._pool(residuals, c), self.codebook_size)
            self.codebook[c] = torch.where(dead, vectors, self.codebook[c])
            self.embed_sum[c] = torch.where(
                dead, vectors * self.restart_threshold, self.embed_sum[c]
            )
            self.cluster_size[c] = torch.where(
                dead[:, 0], self.restart_threshold, self.cluster_size[c]
            )

    def extra_repr(self) -> str:
        kind = "shared" if self.shared_codebook else "separate"
        scaled = ", scaled per depth" if self.depth_scale else ""
        return f"dim={self.dim}, K={self.codebook_size}, D={self.depth}, {kind} codebook{scaled}"


def _at_depth(tau: float | Sequence[float] | None, d: int) -> float | None:
    if tau is None or isinstance(tau, (int, float)):
        return tau
    return float(tau[d])
