"""Sampling codes from an RQ-Transformer: KV-cached, batched, top-k / top-p per depth,
temperature, classifier-free guidance.

The cached sampler runs the spatial transformer once per position (one new token against a
preallocated cache) and the depth transformer once per code, so each step costs a few small
matmuls instead of a forward over the whole prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rqgen.errors import CheckpointError, ConfigError
from rqgen.stage2.rq_transformer import RQTransformer
from rqgen.utils.device import PRECISIONS, resolve_precision


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | Sequence[int] | None = None  # one value, or one per depth
    top_p: float | Sequence[float] | None = None
    cfg_scale: float = 1.0  # classifier-free guidance; 1.0 = off
    # fixed-shape steps over static KV caches, torch.compile'd (CUDA graphs on GPU)
    compile: bool = False

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


def draw(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One sample per row by inverse CDF with one uniform per row: tiny float differences
    between equivalent computations (cached vs not) cannot change the outcome."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, device=logits.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1).squeeze(-1)


def guide(logits: Tensor, n: int, scale: float) -> Tensor:
    """Classifier-free guidance: rows n.. are the unconditional twins of rows ..n."""
    if scale == 1.0:
        return logits
    cond, uncond = logits[:n], logits[n:]
    return uncond + scale * (cond - uncond)


def _next_code(logits: Tensor, d: int, cfg: SamplingConfig, n: int, generator) -> Tensor:
    logits = guide(logits, n, cfg.cfg_scale)
    logits = logits.float() / max(cfg.temperature, 1e-5)
    logits = filter_logits(logits, cfg.at_depth(cfg.top_k, d), cfg.at_depth(cfg.top_p, d))
    return draw(logits, generator)


def _guided_cond(model: RQTransformer, cond: Tensor, cfg: SamplingConfig) -> Tensor:
    if cfg.cfg_scale == 1.0:
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
    n = cond.shape[0]
    codes = torch.zeros(n, c.T, c.D, dtype=torch.long, device=cond.device)
    guided = _guided_cond(model, cond, cfg)
    if cfg.compile and use_cache:
        _sample_static(model, guided, codes, cfg, generator, compiled=True)
    elif use_cache:
        _sample_cached(model, guided, codes, cfg, generator)
    else:
        _sample_uncached(model, guided, codes, cfg, generator)
    return codes.view(n, *c.code_shape)


def _sample_cached(model, cond, codes, cfg, generator) -> None:
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    spatial_cache = model.body_transformer.new_cache(B, c.cond_length + c.T - 1)
    depth_cache = model.head_transformer.new_cache(B, c.D)
    h = model.body_transformer(model.cond_tokens(cond), spatial_cache)[:, -1]
    for t in range(c.T):
        if t > 0:  # feed position t-1's codes: one token through the spatial cache
            prev = codes[:, t - 1 : t].repeat(B // n, 1, 1)
            x = model.input_mlp(model.code_vectors(prev)).sum(-2) + model.pos_emb_hw[:, t - 1]
            h = model.body_transformer(x, spatial_cache)[:, -1]
        for layer_cache in depth_cache:
            layer_cache.reset()
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
            out = model.head_transformer(v, depth_cache)[:, -1]
            codes[:, t, d] = _next_code(model.classifier(out), d, cfg, n, generator)


class StaticDecoder(nn.Module):
    """One spatial step and one depth step of the cached sampler with fixed shapes: a batch
    of one token, static KV caches, positions as tensors. Compiled once per model and batch
    size (`torch.compile`, mode reduce-overhead on CUDA: each step replays a CUDA graph)."""

    def __init__(self, model: RQTransformer, batch: int, compiled: bool):
        super().__init__()
        c = model.config
        self.model = model
        self.spatial_cache = model.body_transformer.new_static_cache(batch, c.cond_length + c.T - 1)
        self.depth_cache = model.head_transformer.new_static_cache(batch, c.D)
        self.spatial_step, self.depth_step = self._spatial, self._depth
        if compiled:
            mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
            self.spatial_step = torch.compile(self._spatial, mode=mode, fullgraph=True,
                                              dynamic=False)  # fmt: skip
            self.depth_step = torch.compile(self._depth, mode=mode, fullgraph=True, dynamic=False)

    def prefill(self, x: Tensor) -> Tensor:
        """The condition tokens (B, L, C) at positions 0..L-1 -> h of the last (B, C)."""
        pos = torch.zeros((), dtype=torch.long, device=x.device)
        return self.model.body_transformer(x, self.spatial_cache, pos)[:, -1]

    def _spatial(self, x: Tensor, pos: Tensor) -> Tensor:
        return self.model.body_transformer(x, self.spatial_cache, pos)[:, -1]

    def _depth(self, v: Tensor, pos: Tensor) -> Tensor:
        return self.model.classifier(self.model.head_transformer(v, self.depth_cache, pos)[:, -1])

    @staticmethod
    def for_model(model: RQTransformer, batch: int, compiled: bool) -> StaticDecoder:
        """Reused across calls: a new decoder (new cache buffers) would be compiled again."""
        p = next(model.parameters())
        key = (batch, compiled, p.device, p.dtype)
        cache = model.__dict__.setdefault("_static_decoders", {})
        if key not in cache:
            cache[key] = StaticDecoder(model, batch, compiled)
        return cache[key]


def _sample_static(model, cond, codes, cfg, generator, compiled: bool) -> None:
    """The cached sampler over static caches: the same arithmetic, fixed shapes."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    dec = StaticDecoder.for_model(model, B, compiled)
    # one 0-dim tensor per position, each its own storage: views of one arange would differ
    # in storage offset, which compiled code guards on (a recompile per position)
    positions = [torch.tensor(i, device=cond.device) for i in range(max(c.cond_length + c.T, c.D))]
    h = dec.prefill(model.cond_tokens(cond))
    for t in range(c.T):
        if t > 0:  # feed position t-1's codes: one token at spatial position L-1+t
            prev = codes[:, t - 1 : t].repeat(B // n, 1, 1)
            x = model.input_mlp(model.code_vectors(prev)).sum(-2) + model.pos_emb_hw[:, t - 1]
            h = dec.spatial_step(x, positions[c.cond_length + t - 1])
        partial = None
        for d in range(c.D):
            if d == 0:
                v = (h + model.pos_emb_d[:, 0])[:, None]
            else:
                e = model.code_vector(codes[:, t, d - 1].repeat(B // n), d - 1)
                partial = e if partial is None else partial + e  # Ẑ(d), Eq. 12
                v = (model.head_mlp(partial) + model.pos_emb_d[:, d])[:, None]
            codes[:, t, d] = _next_code(dec.depth_step(v, positions[d]), d, cfg, n, generator)


def _sample_uncached(model, cond, codes, cfg, generator) -> None:
    """Reference sampler: a full teacher-forced forward for every code (O(T·D) forwards)."""
    c = model.config
    n, B = codes.shape[0], cond.shape[0]
    for t in range(c.T):
        for d in range(c.D):
            logits, _ = model(codes.repeat(B // n, 1, 1), cond)
            codes[:, t, d] = _next_code(logits[:, t, d], d, cfg, n, generator)


@torch.no_grad()
def generate(
    vae,
    model: RQTransformer,
    cond: Tensor,
    cfg: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Codes sampled and decoded batch by batch: codes (B, H, W, D) (a DQ-Transformer gives
    packed DQ-VAE code maps, (B, 2Hc, 2Hc, 2)), images (B, 3, R, R)."""
    from rqgen.stage2.dq_sampling import sample_dq_codes
    from rqgen.stage2.dq_transformer import DQTransformer

    model.check_vae(vae)
    if cfg is not None and cfg.compile and isinstance(model, DQTransformer):
        raise ConfigError("--compile is for RQ-Transformers: sample a DQ-Transformer without it")
    sample = sample_dq_codes if isinstance(model, DQTransformer) else sample_codes
    codes, images = [], []
    for s in range(0, cond.shape[0], batch_size):
        c = sample(model, cond[s : s + batch_size], cfg, generator)
        codes.append(c)
        images.append(vae.decode_codes(c).clamp(-1, 1))
    return torch.cat(codes), torch.cat(images)


def stream_samples(
    vae, model: RQTransformer, cond: Tensor, cfg: SamplingConfig | None, generator,
    batch_size: int, out: str | Path, classes: Sequence[str] = (),
) -> Iterator[Tensor]:  # fmt: skip
    """Sample `cond` batch by batch, write each image to OUT/NNNNNN_<class>.png and yield the
    batch: memory stays at one batch however many samples are drawn."""
    from tqdm import tqdm

    from rqgen.utils.images import save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in tqdm(range(0, cond.shape[0], batch_size), desc="sample", leave=False):
        c = cond[s : s + batch_size]
        images = generate(vae, model, c, cfg, generator, batch_size)[1].cpu()
        for i, (img, k) in enumerate(zip(images, c.tolist())):
            if c.dim() == 2:  # text prompts
                name = "text"
            elif not model.config.num_classes:
                name = "sample"
            else:
                name = classes[k] if k < len(classes) else str(k)
            save_image(img, out / f"{s + i:06d}_{name}.png")
        yield images


def sample_images(vae, model, cond, cfg=None, generator=None, batch_size: int = 64) -> Tensor:
    return generate(vae, model, cond, cfg, generator, batch_size)[1]


@torch.no_grad()
def best_of(
    vae,
    model: RQTransformer,
    cond: Tensor,
    score: Callable[[Tensor, int], Tensor],
    acceptance: float,
    cfg: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Selection by a scorer: for each distinct condition with n rows in `cond`, draw
    ceil(n / acceptance) candidates and keep the n that `score(images, row)` ranks highest
    (`row` indexes `cond` at one row of that condition). Output follows the order of `cond`."""
    if not 0 < acceptance <= 1:
        raise ConfigError(f"acceptance rate must be in (0, 1], got {acceptance}")
    codes = images = None
    groups, inverse = cond.unique(dim=0, return_inverse=True)
    for g in range(len(groups)):
        where = (inverse == g).nonzero().squeeze(1)
        m = math.ceil(len(where) / acceptance - 1e-9)  # 1/3 must give 3n, not 3n+1
        full = cond[where[:1]].expand(m, *cond.shape[1:])
        cand_codes, cand = generate(vae, model, full, cfg, generator, batch_size)
        keep = score(cand, int(where[0])).topk(len(where)).indices
        if images is None:
            codes = cand_codes.new_empty(len(cond), *cand_codes.shape[1:])
            images = cand.new_empty(len(cond), *cand.shape[1:])
        codes[where], images[where] = cand_codes[keep], cand[keep]
    return codes, images


def rejection_sample(
    vae, model, cond, classifier: torch.nn.Module, acceptance: float, cfg=None, generator=None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The paper's rejection sampling: of ceil(n / acceptance) candidates per class keep the
    n that `classifier` finds most likely to be the requested class."""

    def score(images: Tensor, row: int) -> Tensor:
        return classifier(images).softmax(-1)[:, int(cond[row])]

    return best_of(vae, model, cond, score, acceptance, cfg, generator, batch_size)


def clip_rerank(
    vae, model, cond, texts: list[str], scorer, candidates: int, cfg=None, generator=None,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """CLIP re-ranking (best of `candidates` per image): `texts[i]` describes row i of `cond`
    (its prompt, or a caption built from its class); `scorer` is a `CLIPScorer`."""
    if candidates < 1:
        raise ConfigError(f"CLIP re-ranking needs at least 1 candidate per image, got {candidates}")

    def score(images: Tensor, row: int) -> Tensor:
        return scorer.similarity(images, [texts[row]] * len(images)).to(images.device)

    return best_of(vae, model, cond, score, 1 / candidates, cfg, generator, batch_size)


def load_for_sampling(
    model_dir: str | Path, vae_dir: str | Path | None = None, device="cpu", dtype: str = "fp32"
):
    """The transformer (RQ or DQ), the VAE it records (or `vae_dir`), its metadata and
    tokenizer. `dtype` (fp32, bf16, fp16, or auto: bf16 on CUDA, fp32 on CPU) is the
    transformer's: its weights and KV caches are cast, logits are sampled in fp32, and the
    VAE decodes in fp32."""
    from rqgen.checkpoint import read_config
    from rqgen.stage1 import load_vae
    from rqgen.stage2.dq_transformer import DQTransformer
    from rqgen.stage2.text import TextTokenizer

    meta = read_config(model_dir)
    classes = {RQTransformer.model_type: RQTransformer, DQTransformer.model_type: DQTransformer}
    if meta.get("model_type") not in classes:
        raise CheckpointError(
            f"'{model_dir}' holds a {meta.get('model_type')!r} model, not an RQ- or "
            "DQ-Transformer: pass a directory written by rqgen train-ar"
        )
    model = classes[meta["model_type"]].from_pretrained(model_dir, map_location=device)
    if vae_dir is None:
        if "vae" not in meta:
            raise CheckpointError(f"'{model_dir}' does not record its VAE: pass --vae DIR")
        vae_dir = Path(model_dir) / meta["vae"]
    vae = load_vae(vae_dir, map_location=device)
    model.check_vae(vae)  # before the cast: the fingerprint is of the fp32 codebook
    model.to(PRECISIONS[resolve_precision(dtype, torch.device(device))])
    tokenizer = None
    if getattr(model.config, "text_vocab_size", 0):
        tokenizer = TextTokenizer.load(model_dir, model.config.text_length)
    return model, vae, meta, tokenizer
