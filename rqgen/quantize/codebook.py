"""How the residual quantizer's codebook learns: data-dependent init, one EMA update per
forward over all depths (with the per-depth scales), Jukebox-style restarts; and, at a frozen
encoder, a least-squares refinement on the final error.

A mixin of `ResidualQuantizer` (its buffers and settings live there); every statistic goes
through `distributed`, so all ranks hold the same codebook after every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rqgen.quantize import distributed as dist


class CodebookLearning:
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
            x = self._lookup_space(r, d)
            if d == c:  # the first depth a codebook serves: drawn from its residuals
                vectors = dist.random_rows(x, self.codebook_size)
                self.codebook[c] = vectors
                self.embed_sum[c] = vectors
                self.cluster_size[c] = 1.0
            if d + 1 < self.depth and (self.depth_scale or not self.shared_codebook):
                k = self._search(x, c, None, None)  # the next depth sees this one's residuals
                r = r - self._code_space(F.embedding(k, self.codebook[c]), d)
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

    # every code vector of every codebook in one system: (num_codebooks·K)² floats
    MAX_REFINE_CODES = 4096

    @property
    def refinable(self) -> bool:
        """Whether `refine`'s system (all code vectors at once) is small enough."""
        return self.num_codebooks * self.codebook_size <= self.MAX_REFINE_CODES

    @torch.no_grad()
    def refine(self, z: Tensor, iterations: int) -> None:
        """Alternate greedy codes (Eq. 3-4) and the codebook that minimises the final error
        Σ_n ||z_n − Σ_d s_d·c(k_nd)||² for those codes (Eq. 5 with the scales): one linear
        system over all code vectors, since every depth's code is a term of the same sum.
        The EMA update instead fits each code to the mean of the residuals it was chosen for
        at each depth, which is not the final error when the codebook is shared. For latents
        z (N, dim) of a frozen encoder; unused codes keep their vectors. Single process."""
        n_cols = self.num_codebooks * self.codebook_size
        if not self.refinable:
            raise ValueError(f"refine solves for {n_cols} code vectors: at most "
                             f"{self.MAX_REFINE_CODES}")  # fmt: skip
        z = z.float().reshape(-1, self.dim)
        s = self.scale if self.depth_scale else torch.ones(self.depth, device=z.device)
        for _ in range(iterations):
            codes = self._residual_quantize(z)[0]
            col = codes + torch.tensor(
                [self.codebook_index(d) * self.codebook_size for d in range(self.depth)],
                device=z.device,
            )
            # normal equations A·E = B of min_E Σ_n ||z_n − Σ_d s_d E[col_nd]||²
            A = torch.zeros(n_cols * n_cols, device=z.device)
            B = torch.zeros(n_cols, self.dim, device=z.device)
            for d in range(self.depth):
                B.index_add_(0, col[:, d], z * s[d])
                for e in range(self.depth):
                    pair = col[:, d] * n_cols + col[:, e]
                    A.index_add_(0, pair, (s[d] * s[e]).expand(len(z)))
            A = A.reshape(n_cols, n_cols)
            used = A.diagonal() > 0
            E = self.codebook.reshape(n_cols, self.dim).clone()
            ridge = 1e-3 * A.diagonal()[used].mean()  # towards the current vectors
            system = A[used][:, used] + ridge * torch.eye(int(used.sum()), device=z.device)
            E[used] = torch.linalg.solve(system, B[used] + ridge * E[used])
            self.codebook.copy_(E.reshape(self.codebook.shape))
        self.embed_sum.copy_(self.codebook * self.cluster_size.unsqueeze(-1))  # EMA goes on
