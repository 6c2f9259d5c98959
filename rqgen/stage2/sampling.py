"""Sampling codes from an RQ-Transformer: KV-cached, batched, top-k / top-p per depth,
temperature, classifier-free guidance. (The DQ-Transformer's sampler is dq_sampling.py;
decoding, batching and selection are the pipeline's, rqgen/pipeline.py.)

The cached sampler runs the spatial transformer once per position (one new token against a
preallocated cache) and the depth transformer once per code, so each step costs a few small
matmuls instead of a forward over the whole prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rqgen.stage2.decoders import EagerDecoder, StaticDecoder
from rqgen.stage2.guidance import Draws, SamplingConfig, next_code
from rqgen.stage2.rq_transformer import RQTransformer


def _guided_cond(model: RQTransformer, cond: Tensor, cfg: SamplingConfig) -> Tensor:
    if cfg.guidance_scale == 1.0:
        return cond
    if model.config.text_vocab_size:
        null = torch.full_like(cond, model.config.text_pad_id)  # the empty caption
    else:
        null = torch.full_like(cond, model.null_class)
    return torch.cat([cond, null])


@torch.no_grad()
def sample_codes(
    model: RQTransformer,
    cond: Tensor,
    cfg: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Codes (B, H, W, D) for conditions `cond` ((B,) class ids / null, or (B, L) text).

    With `cfg.compile` the per-step networks run with fixed shapes over static KV caches,
    compiled with torch.compile (CUDA graphs on GPU): the same codes as the eager sampler
    up to floating-point reassociation."""
    cfg = cfg or SamplingConfig()
    model.eval()
    c = model.config
    cfg.check(c.D)
    n = cond.shape[0]
    codes = torch.zeros(n, c.T, c.D, dtype=torch.long, device=cond.device)
    generator = Draws.of(generator, c.T * c.D, cond.device)  # one draw per code
    guided = _guided_cond(model, cond, cfg)
    if use_cache:
        B = guided.shape[0]
        decoder = StaticDecoder.for_model(model, B, True) if cfg.compile else EagerDecoder(model, B)
        _sample_cached(model, guided, codes, cfg, generator, decoder)
    else:
        _sample_uncached(model, guided, codes, cfg, generator)
    return codes.view(n, *c.code_shape)


def _sample_cached(model, cond, codes, cfg, generator, decoder) -> None:
    """The KV-cached sampler: the spatial transformer once per position, the depth
    transformer once per code, each through `decoder` (eager with growing caches, or fixed
    shapes over static caches, possibly compiled: the same arithmetic)."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    h = decoder.prefill(model.cond_tokens(cond))
    for t in range(c.T):
        if t > 0:  # feed position t-1's codes: one token at spatial position L-1+t
            prev = codes[:, t - 1 : t].repeat(B // n, 1, 1)
            x = model.input_mlp(model.code_vectors(prev)).sum(-2) + model.pos_emb_hw[:, t - 1]
            h = decoder.spatial_step(x, c.cond_length + t - 1)
        partial = None
        for d in range(c.D):
            if d == 0:
                v = (h + model.pos_emb_d[:, 0])[:, None]
            else:
                # depth d-1's own codebook: a one-wide slice through code_vectors would look
                # every depth up in codebook 0
                e = model.code_vector(codes[:, t, d - 1].repeat(B // n), d - 1)
                partial = e if partial is None else partial + e  # Ẑ(d), Eq. 12
                v = (model.head_mlp(partial) + model.pos_emb_d[:, d])[:, None]
            codes[:, t, d] = next_code(decoder.depth_step(v, d), d, cfg, n, generator)


def _sample_uncached(model, cond, codes, cfg, generator) -> None:
    """Reference sampler: a full teacher-forced forward for every code (O(T·D) forwards)."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    for t in range(c.T):
        for d in range(c.D):
            logits, _ = model(codes.repeat(B // n, 1, 1), cond)
            codes[:, t, d] = next_code(logits[:, t, d], d, cfg, n, generator)
