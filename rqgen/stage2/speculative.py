"""Speculative Jacobi decoding (SJD, Teng et al. 2024, arXiv 2410.01699) for an RQ-Transformer:
fewer sequential spatial passes, the same distribution as plain sampling.

Each pass drafts the code stacks of the next N positions, runs the spatial transformer once
over them (one KV-cached pass of N tokens) and the depth transformer once, teacher-forced over
the drafted stacks, which gives the model's probability p of every drafted code given the
drafts before it. The drafts are then checked in the model's order, position by position and
depth by depth: a code x drawn from a proposal q is kept with probability min(1, p(x)/q(x));
at the first rejection the code is redrawn from max(0, p − q) (normalised) and the rest of
that position's stack from the model itself. This is speculative sampling's rule, which
makes every kept code an exact draw from the model's conditional: the output distribution
is plain sampling's whatever the drafts are. The drafts of the next pass are the Jacobi
update: each still-open position's codes are drawn from this pass's p (conditioned on the
old drafts), and positions new to the window from the last one's.

Every sample advances at its own pace: the spatial KV cache is written at a position per
row, so a batch takes as many passes as its slowest sample, not the sum of everyone's
rejections. Each pass draws the same number of uniforms per sample whatever happens, so with
per-sample seeds a sample does not depend on its batch. benchmarks/results/speculative.md
says where it pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rqgen.errors import ConfigError
from rqgen.stage2.guidance import PerSampleSeeds, SamplingConfig, processed_logits
from rqgen.stage2.rq_transformer import RQTransformer
from rqgen.stage2.sampling import guided_cond


@dataclass
class SpeculativeStats:
    """Sequential network calls of one batch: plain sampling makes T spatial and T·D depth
    calls."""

    spatial_passes: int = 0
    depth_passes: int = 0


class Uniforms:
    """The uniforms the sampler consumes: from one generator, or (PerSampleSeeds) from one
    stream per sample, so that a sample does not depend on its batch."""

    def __init__(self, generator, n: int, device):
        self.n, self.device = n, device
        self.streams = None
        if isinstance(generator, PerSampleSeeds):
            self.streams = [torch.Generator().manual_seed(s) for s in generator.seeds]
        self.generator = None if self.streams else generator

    def __call__(self, *shape: int) -> Tensor:
        if self.streams is None:
            return torch.rand((self.n, *shape), device=self.device, generator=self.generator)
        return torch.stack([torch.rand(shape, generator=g) for g in self.streams]).to(self.device)


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One code per row of (unnormalised) probabilities (..., K), uniforms u (...)."""
    cdf = probs.cumsum(-1)
    k = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous())
    return k.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def _probs(logits: Tensor, sampling: SamplingConfig, n: int) -> Tensor:
    """(rows, W, D, K) logits -> the sampling distribution (n, W, D, K) of every code: guidance,
    temperature and top-k / top-p per depth, as plain sampling draws from."""
    out = [processed_logits(logits[:, :, d], d, sampling, n) for d in range(logits.shape[2])]
    return torch.stack(out, 2).softmax(-1)


def window_logits(
    model: RQTransformer, cache, tentative: Tensor, done: Tensor, last_cond: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """Logits (rows, width, D, K) and h (rows, width, C) of positions done[b].. of each row,
    given its codes `tentative` (rows, T + width, D): final codes, then drafts. One spatial
    pass writes the inputs of the window at each row's own place in the static `cache`
    (which holds the condition tokens before the last and the inputs of positions before
    done[b]); one teacher-forced depth pass. Position 0's input is the last condition token
    `last_cond` (rows, C), whose output predicts it."""
    c = model.config
    at = done[:, None] + torch.arange(width, device=done.device)  # (rows, width) positions
    before = (at - 1).clamp(min=0)  # position p's input holds the codes of p - 1
    prev = tentative.gather(1, before[..., None].expand(-1, -1, c.D))
    x = model.code_inputs(prev)
    x = x + model.pos_emb_hw[0, before.clamp(max=c.T - 1)]
    x = torch.where((at == 0)[..., None], last_cond[:, None], x)
    h = model.spatial_transformer(x, cache, c.cond_length - 1 + done)
    rows = h.shape[0]
    stacks = tentative.gather(1, at[..., None].expand(-1, -1, c.D)).reshape(rows * width, c.D)
    v = model.depth_inputs(h.reshape(rows * width, -1), stacks[:, :-1])
    logits = model.classifier(model.depth_transformer(v))
    return logits.view(rows, width, c.D, c.codebook_size), h


def _complete(model, h, stack, start, u, sampling, n: int, stats) -> None:
    """Draw depths > start[b] of each row's stack (in place) from the model, with uniforms
    u (n, D): the stacks whose code start[b] was just redrawn."""
    rep = h.shape[0] // n
    for d in range(model.config.D):
        need = d > start
        if not bool(need.any()):
            continue
        v = model.depth_inputs(h, stack[:, :d].repeat(rep, 1))
        logits = model.classifier(model.depth_transformer(v)[:, -1])
        drawn = inverse_cdf(processed_logits(logits, d, sampling, n).softmax(-1), u[:, d])
        stack[:, d] = torch.where(need, drawn, stack[:, d])
        stats.depth_passes += 1


@torch.no_grad()
def sample_codes_speculative(
    model: RQTransformer,
    cond: Tensor,
    sampling: SamplingConfig,
    generator=None,
) -> tuple[Tensor, SpeculativeStats]:
    """Codes (B, H, W, D) with `sampling.speculative` = N positions drafted per pass, and the
    sequential calls it took."""
    c, N = model.config, sampling.speculative
    if sampling.compile:
        raise ConfigError("speculative sampling runs eagerly: drop --compile")
    if c.stop_code:
        raise ConfigError("speculative sampling drafts full stacks: sample a dynamic-depth "
                          "model without --speculative")  # fmt: skip
    model.eval()
    sampling.check(c.D)
    n, dev, K, D, T = cond.shape[0], cond.device, c.codebook_size, c.D, c.T
    guided = guided_cond(model, cond, sampling)
    rep = guided.shape[0] // n
    uniforms, stats = Uniforms(generator, n, dev), SpeculativeStats()
    start = model.cond_tokens(guided)
    cache = model.spatial_transformer.new_static_cache(guided.shape[0], c.cond_length + T + N)
    if start.shape[1] > 1:  # the condition tokens but the last: windows at 0 re-feed it
        model.spatial_transformer(start[:, :-1], cache, torch.tensor(0, device=dev))
    codes = torch.zeros(n, T + N, D, dtype=torch.long, device=dev)  # N spare: no clamping
    done = torch.zeros(n, dtype=torch.long, device=dev)
    offsets, rows = torch.arange(N, device=dev), torch.arange(n, device=dev)
    q = torch.full((n, N, D, K), 1.0 / K, device=dev)  # the first drafts: uniform
    draft = inverse_cdf(q, uniforms(N, D))
    while bool((done < T).any()):
        width = (T - done).clamp(max=N)  # the window of each row that lies in the image
        at = (done[:, None] + offsets)[..., None].expand(-1, -1, D)
        codes.scatter_(1, at, draft)  # before done: final; in the window: drafts
        logits, h = window_logits(
            model, cache, codes.repeat(rep, 1, 1), done.repeat(rep), start[:, -1], N
        )
        stats.spatial_passes += 1
        stats.depth_passes += 1
        p = _probs(logits, sampling, n)  # (n, N, D, K)
        x = draft[..., None]
        ok = (uniforms(N, D) * q.gather(-1, x)[..., 0] < p.gather(-1, x)[..., 0]).reshape(n, -1)
        first_no = ok.long().cumprod(1).sum(1)  # the first rejected code, in (t, d) order
        kept = torch.minimum(torch.div(first_no, D, rounding_mode="floor"), width)
        resolve = kept < width  # rows with a rejection inside their window
        # the rejected code redrawn from max(0, p - q), the rest of its stack from the model
        j = kept.clamp(max=N - 1)
        d = torch.where(resolve, first_no % D, D)
        dd = d.clamp(max=D - 1)
        pr, qr = p[rows, j, dd], q[rows, j, dd]
        residual = (pr - qr).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pr)
        redrawn, u_rest = inverse_cdf(residual, uniforms()), uniforms(D)
        stack = draft[rows, j].clone()
        stack[rows, dd] = torch.where(resolve, redrawn, stack[rows, dd])
        h_at = h[torch.arange(h.shape[0], device=dev), j.repeat(rep)]
        _complete(model, h_at, stack, d, u_rest, sampling, n, stats)
        place = (done + kept).clamp(max=T + N - 1)
        codes[rows, place] = torch.where(resolve[:, None], stack, codes[rows, place])
        shift = kept + resolve.long()
        done = done + shift
        # Jacobi update: open positions from this pass's p, new ones from its last position
        j = (shift[:, None] + offsets).clamp(max=N - 1)
        q = p.gather(1, j[..., None, None].expand(-1, -1, D, K))
        draft = inverse_cdf(q, uniforms(N, D))
    return codes[:, :T].reshape(n, *c.code_shape), stats
