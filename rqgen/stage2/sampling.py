"""Sampling codes from an RQ-Transformer: KV-cached, batched, top-k / top-p per depth,
temperature, classifier-free guidance. (The DQ-Transformer's sampler is dq_sampling.py;
decoding, batching and selection are the pipeline's, rqgen/pipeline.py.)

The cached sampler runs the spatial transformer once per position (one new token against a
preallocated cache) and the depth transformer once per code, so each step costs a few small
matmuls instead of a forward over the whole prefix. It runs the model one token at a time
through one of two decoders, behind one interface (`prefill(cond_tokens)`,
`spatial_step(x, position)`, `depth_step(v, depth)`): `EagerDecoder` grows per-layer KV
caches and attends to what is filled; `StaticDecoder` keeps every shape fixed (static
caches written at tensor positions, attention under a mask) so that its steps compile once,
and on GPU replay as CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rqgen.errors import ConfigError
from rqgen.stage2.guidance import Draws, SamplingConfig, next_code
from rqgen.stage2.rq_transformer import RQTransformer


def guided_cond(model: RQTransformer, cond: Tensor, sampling: SamplingConfig) -> Tensor:
    if sampling.guidance_scale == 1.0:
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
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Codes (B, H, W, D) for conditions `cond` ((B,) class ids / null, or (B, L) text).

    With `sampling.compile` the per-step networks run with fixed shapes over static KV caches,
    compiled with torch.compile (CUDA graphs on GPU): the same codes as the eager sampler
    up to floating-point reassociation."""
    sampling = sampling or SamplingConfig()
    model.eval()
    c = model.config
    sampling.check(c.D)
    n = cond.shape[0]
    codes = torch.zeros(n, c.T, c.D, dtype=torch.long, device=cond.device)
    generator = Draws.of(generator, c.T * c.D, cond.device)  # one draw per code
    guided = guided_cond(model, cond, sampling)
    if sampling.compile and getattr(model, "int8", False):
        raise ConfigError("--compile cannot trace int8 layers: sample int8 without it")
    if use_cache:
        B = guided.shape[0]
        decoder = (
            StaticDecoder.for_model(model, B, True) if sampling.compile else EagerDecoder(model, B)
        )
        _sample_cached(model, guided, codes, sampling, generator, decoder)
    else:
        _sample_uncached(model, guided, codes, sampling, generator)
    return codes.view(n, *c.code_shape)


def _sample_cached(model, cond, codes, sampling, generator, decoder) -> None:
    """The KV-cached sampler: the spatial transformer once per position, the depth
    transformer once per code, each through `decoder` (eager with growing caches, or fixed
    shapes over static caches, possibly compiled: the same arithmetic)."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    h = decoder.prefill(model.cond_tokens(cond))
    for t in range(c.T):
        if t > 0:  # feed position t-1's codes: one token at spatial position L-1+t
            prev = codes[:, t - 1 : t].repeat(B // n, 1, 1)
            x = model.code_inputs(prev) + model.pos_emb_hw[:, t - 1]
            h = decoder.spatial_step(x, c.cond_length + t - 1)
        partial = previous = None
        for d in range(c.D):
            if d == 0:
                v = (h + model.pos_emb_d[:, 0])[:, None]
            else:
                # depth d-1's own codebook: a one-wide slice through code_vectors would look
                # every depth up in codebook 0
                previous = codes[:, t, d - 1].repeat(B // n)
                e = model.code_vector(previous, d - 1)
                partial = e if partial is None else partial + e  # Ẑ(d), Eq. 12
                v = (model.head_mlp(partial) + model.pos_emb_d[:, d])[:, None]
            logits = model.constrain(decoder.depth_step(v, d), d, previous)
            codes[:, t, d] = stay_ended(
                model, next_code(logits, d, sampling, n, generator), previous
            )


def _sample_uncached(model, cond, codes, sampling, generator) -> None:
    """Reference sampler: a full teacher-forced forward for every code (O(T·D) forwards)."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    for t in range(c.T):
        for d in range(c.D):
            logits, _ = model(codes.repeat(B // n, 1, 1), cond)
            previous = codes[:, t, d - 1].repeat(B // n) if d else None
            logits = model.constrain(logits[:, t, d], d, previous)
            codes[:, t, d] = stay_ended(
                model, next_code(logits, d, sampling, n, generator), previous
            )


def stay_ended(model: RQTransformer, code: Tensor, previous: Tensor | None) -> Tensor:
    """A stack that has ended (stop code at depth d-1) keeps the stop code, whatever a draw
    of probability zero (a uniform of exactly 0) returned."""
    if previous is None or not model.config.stop_code:
        return code
    stop = model.config.codebook_size
    return torch.where(previous[: code.shape[0]] == stop, stop, code)


class EagerDecoder:
    def __init__(self, model: RQTransformer, batch: int):
        c = model.config
        self.model = model
        self.spatial_cache = model.spatial_transformer.new_cache(batch, c.cond_length + c.T - 1)
        self.depth_cache = model.depth_transformer.new_cache(batch, c.D)

    def prefill(self, x: Tensor) -> Tensor:
        """The condition tokens (B, L, C) -> h of the last one (B, C)."""
        return self.model.spatial_transformer(x, self.spatial_cache)[:, -1]

    def spatial_step(self, x: Tensor, position: int) -> Tensor:
        return self.model.spatial_transformer(x, self.spatial_cache)[:, -1]

    def depth_step(self, v: Tensor, depth: int) -> Tensor:
        """Logits of code `depth` at the current position (a new position at depth 0)."""
        if depth == 0:
            for layer_cache in self.depth_cache:
                layer_cache.reset()
        return self.model.classifier(self.model.depth_transformer(v, self.depth_cache)[:, -1])


_COMPILED_DECODERS = 0


def _allow_one_more_compilation() -> None:
    """Every compiled decoder (one per model, batch size and dtype) compiles the same two
    methods again, and dynamo counts those against one limit per method (8 by default):
    past it torch would run them eagerly without an error, so a process that samples many
    batch sizes would silently lose compilation. Raise the limit as decoders are made."""
    global _COMPILED_DECODERS
    _COMPILED_DECODERS += 1
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across releases
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 8 + _COMPILED_DECODERS))
            break


class StaticDecoder(nn.Module):
    """One spatial step and one depth step with fixed shapes: a batch of one token, static KV
    caches, positions as tensors. With `compiled`, both steps go through `torch.compile`
    (mode reduce-overhead on CUDA: each step replays a CUDA graph), once per model and batch
    size: `for_model` keeps the decoder, whose cache buffers the compiled code is tied to."""

    def __init__(self, model: RQTransformer, batch: int, compiled: bool):
        super().__init__()
        c = model.config
        self.model = model
        self.spatial_cache = model.spatial_transformer.new_static_cache(
            batch, c.cond_length + c.T - 1
        )
        self.depth_cache = model.depth_transformer.new_static_cache(batch, c.D)
        device = next(model.parameters()).device
        # one 0-dim tensor per position, each its own storage: views of one arange would
        # differ in storage offset, which compiled code guards on (a recompile per position)
        self.positions = [
            torch.tensor(i, device=device) for i in range(max(c.cond_length + c.T, c.D))
        ]
        self._spatial_fn, self._depth_fn = self._spatial, self._depth
        if compiled:
            _allow_one_more_compilation()
            mode = "reduce-overhead" if device.type == "cuda" else None
            compile = lambda f: torch.compile(f, mode=mode, fullgraph=True, dynamic=False)  # noqa: E731
            self._spatial_fn, self._depth_fn = compile(self._spatial), compile(self._depth)

    def prefill(self, x: Tensor) -> Tensor:
        """The condition tokens (B, L, C) at positions 0..L-1 -> h of the last (B, C)."""
        return self.model.spatial_transformer(x, self.spatial_cache, self.positions[0])[:, -1]

    def spatial_step(self, x: Tensor, position: int) -> Tensor:
        return self._spatial_fn(x, self.positions[position])

    def depth_step(self, v: Tensor, depth: int) -> Tensor:
        return self._depth_fn(v, self.positions[depth])

    def _spatial(self, x: Tensor, pos: Tensor) -> Tensor:
        return self.model.spatial_transformer(x, self.spatial_cache, pos)[:, -1]

    def _depth(self, v: Tensor, pos: Tensor) -> Tensor:
        return self.model.classifier(self.model.depth_transformer(v, self.depth_cache, pos)[:, -1])

    @staticmethod
    def for_model(model: RQTransformer, batch: int, compiled: bool) -> StaticDecoder:
        """Reused across calls: a new decoder (new cache buffers) would be compiled again."""
        p = next(model.parameters())
        key = (batch, compiled, p.device, p.dtype)
        cache = model.__dict__.setdefault("_static_decoders", {})
        if key not in cache:
            cache[key] = StaticDecoder(model, batch, compiled)
        return cache[key]
