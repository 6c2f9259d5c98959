"""From logits to a code, shared by every sampler (RQ and DQ): classifier-free guidance,
temperature, top-k / top-p filtering and an inverse-CDF draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rqgen.errors import ConfigError


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | Sequence[int] | None = None  # one value, or one per depth
    top_p: float | Sequence[float] | None = None
    guidance_scale: float = 1.0  # classifier-free guidance; 1.0 = off
    # fixed-shape steps over static KV caches, torch.compile'd (CUDA graphs on GPU)
    compile: bool = False
    # speculative Jacobi decoding: positions drafted and verified per spatial pass; 0 = off
    speculative: int = 0

    def check(self, depth: int) -> None:
        """Per-depth values must give one value per depth: a list of another length would be
        cut short or fail mid-sampling."""

        for name, value in (("top_k", self.top_k), ("top_p", self.top_p)):
            if isinstance(value, Sequence) and len(value) != depth:
                raise ConfigError(
                    f"{name} has {len(value)} values but the model draws {depth} code(s) per "
                    f"position: give one value, or {depth} comma-separated"
                )

    def at_depth(self, value, d: int):
        if value is None or isinstance(value, (int, float)):
            return value
        return value[d]


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Keep the top-k logits, then the smallest set whose probability reaches top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class PerSampleSeeds:
    """One seed per sample, given where a torch.Generator would be: each sample then draws
    its uniforms from its own stream, so it comes out the same whatever batch, batch size or
    process (torchrun rank) draws it. Slicing gives the seeds of a slice of the samples."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, part: slice) -> PerSampleSeeds:
        return PerSampleSeeds(self.seeds[part])


class Draws:
    """The uniforms a sampler consumes, in order: from its generator, or (PerSampleSeeds)
    from a table of `count` uniforms per sample drawn up front from each sample's stream."""

    def __init__(self, seeds: PerSampleSeeds, count: int, device):
        self.table = torch.stack(
            [torch.rand(count, generator=torch.Generator().manual_seed(s)) for s in seeds.seeds]
        ).to(device)
        self.k = 0

    @staticmethod
    def of(generator, count: int, device):
        """What a sampler draws from: a Draws table for PerSampleSeeds, else the generator."""
        return (
            Draws(generator, count, device) if isinstance(generator, PerSampleSeeds) else generator
        )

    def next(self, rows: int) -> Tensor:
        if rows != self.table.shape[0] or self.k >= self.table.shape[1]:
            raise RuntimeError("per-sample draws out of step with the sampler")
        self.k += 1
        return self.table[:, self.k - 1 : self.k]


def draw(logits: Tensor, generator: torch.Generator | Draws | None) -> Tensor:
    """One sample per row by inverse CDF with one uniform per row: tiny float differences
    between equivalent computations (cached vs not) cannot change the outcome."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    if isinstance(generator, Draws):
        u = generator.next(logits.shape[0])
    else:
        u = torch.rand(logits.shape[0], 1, device=logits.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1).squeeze(-1)


def guide(logits: Tensor, n: int, scale: float) -> Tensor:
    """Classifier-free guidance: rows n.. are the unconditional twins of rows ..n."""
    if scale == 1.0:
        return logits
    cond, uncond = logits[:n], logits[n:]
    return uncond + scale * (cond - uncond)


def next_code(logits: Tensor, d: int, sampling: SamplingConfig, n: int, generator) -> Tensor:
    """One code per condition from the logits of depth (or step) d: guidance, temperature,
    top-k / top-p, then one draw."""
    return draw(processed_logits(logits, d, sampling, n), generator)


def processed_logits(logits: Tensor, d: int, sampling: SamplingConfig, n: int) -> Tensor:
    """The logits codes of depth (or step) d are drawn from: guided (rows n.. are the
    unconditional twins), tempered and filtered; (rows, ..., K) -> (n, ..., K) float."""
    logits = guide(logits.float(), n, sampling.guidance_scale)
    # a huge guidance scale or a tiny temperature overflows to +inf, and several +inf make
    # softmax NaN (garbage codes without a word): saturate at the largest float instead, so
    # the draw becomes the greedy choice it tends to
    big = torch.finfo(torch.float32).max
    logits = (logits / max(sampling.temperature, 1e-5)).clamp_(-big, big)
    return filter_logits(
        logits, sampling.at_depth(sampling.top_k, d), sampling.at_depth(sampling.top_p, d)
    )
