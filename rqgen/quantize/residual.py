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
- `commitment="final"` (not in the paper): Eq. 7's commitment to the decoded sum only,
  ||z - sg[Ẑ]||², instead of to every partial sum. Eq. 7 also pulls z towards Ẑ(1), which
  a shared codebook fits worse than separate ones; the final sum is what the decoder sees.
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

from rqgen.quantize.codebook import CodebookLearning
from rqgen.quantize.dynamic import decode_stacks
from rqgen.quantize.estimators import ESTIMATORS, cross
from rqgen.quantize.search import nearest


@dataclass
class QuantizerOutput:
    quantized: Tensor  # Ẑ, its gradient to z per `gradient_estimator`; z's shape and dtype
    codes: Tensor  # (..., D) int64 code map M
    commitment_loss: Tensor  # β · Σ_d ||z - sg[Ẑ(d)]||² (Eq. 7), or β·||z - sg[Ẑ]||², a scalar


class ResidualQuantizer(CodebookLearning, nn.Module):
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
        commitment: str = "all",
    ) -> None:
        super().__init__()
        if depth < 1 or codebook_size < 2 or dim < 1:
            raise ValueError(f"need depth >= 1, codebook_size >= 2, dim >= 1; got {depth=}")
        if gradient_estimator not in ESTIMATORS:
            raise ValueError(
                f"gradient_estimator={gradient_estimator!r}: use {', '.join(ESTIMATORS)}"
            )
        if commitment not in ("all", "final"):
            raise ValueError(f"commitment={commitment!r}: use all (Eq. 7) or final")
        self.commitment = commitment
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

    def _lookup_space(self, r: Tensor, d: int) -> Tensor:
        """r / s_d: the residual entering depth d where its codebook's codes live."""
        return r / self.scale[d] if self.depth_scale else r

    def _code_space(self, c: Tensor, d: int) -> Tensor:
        """e = s_d·c: codebook vectors c as depth d adds them."""
        return c * self.scale[d] if self.depth_scale else c

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
        """Nearest code of each row of x (N, dim) in codebook c; or a sample from Q_τ."""
        # chunks of ~2 MB of distances, never fewer than min_rows rows (search.py)
        rows = max(self.min_rows, self.max_distance_elements // self.codebook_size)
        return nearest(x, self.codebook[c], rows, tau, generator)

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
            k = self._search(self._lookup_space(r, d), c, t, generator)
            e = self._code_space(F.embedding(k, self.codebook[c]), d)
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
        output is the partial sum Ẑ(d) (quantizer dropout); codes, the codebook update and
        Eq. 7's commitment still see every depth (`commitment="final"`: the output Ẑ(d))."""
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
            zhat, d = partials[-1], None
            if depths is not None:  # Ẑ(d) of each vector's own depth d
                d = depths.to(device=zf.device, dtype=torch.long).expand(lead).reshape(-1)
                zhat = partials.gather(0, (d - 1)[None, :, None].expand(1, -1, self.dim))[0]
            # Eq. 7: commitment to every partial sum, summed over depths; or to the output only
            targets = partials if self.commitment == "all" else zhat[None]
            err = (zf - targets).pow(2).mean(-1)  # (targets, N): mean over channels
            if w is None:
                commit = err.mean(-1).sum()
            else:  # weighted mean over vectors
                commit = ((err * w).sum(-1) / w.sum().clamp_min(1e-12)).sum()
            quantized = cross(self.gradient_estimator, zf, zhat, partials, d)
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
        """Ẑ(depth) = Σ_{d ≤ depth} e(k_d) (default: all D depths) -> (..., dim); a stack
        ends at its stop code K (a dynamic code map, quantize/dynamic.py)."""
        depth = codes.shape[-1] if depth is None else depth
        if not 1 <= depth <= codes.shape[-1]:
            raise ValueError(f"depth must be in 1..{codes.shape[-1]}, got {depth}")
        return decode_stacks(self, codes[..., :depth])

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

    def extra_repr(self) -> str:
        kind = "shared" if self.shared_codebook else "separate"
        scaled = ", scaled per depth" if self.depth_scale else ""
        return f"dim={self.dim}, K={self.codebook_size}, D={self.depth}, {kind} codebook{scaled}"


def _at_depth(tau: float | Sequence[float] | None, d: int) -> float | None:
    if tau is None or isinstance(tau, (int, float)):
        return tau
    return float(tau[d])
