"""Sampling codes from an RQ-Transformer: KV-cached, batched, top-k / top-p per depth,
temperature, classifier-free guidance.

The cached sampler runs the spatial transformer once per position (one new token against a
preallocated cache) and the depth transformer once per code, so each step costs a few small
matmuls instead of a forward over the whole prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from rqgen.errors import CheckpointError, ConfigError
from rqgen.stage2.decoders import EagerDecoder, StaticDecoder
from rqgen.stage2.dq_sampling import sample_dq_codes
from rqgen.stage2.dq_transformer import DQTransformer
from rqgen.stage2.guidance import Draws, PerSampleSeeds, SamplingConfig, next_code
from rqgen.stage2.rq_transformer import RQTransformer
from rqgen.utils.device import PRECISIONS, resolve_precision


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


@torch.no_grad()
def _part(generator, start: int, size: int):
    """What samples start..start+size draw from: their seeds, or the shared generator."""
    if isinstance(generator, PerSampleSeeds):
        return generator[start : start + size]
    return generator


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
    model.check_vae(vae)
    if cfg is not None and cfg.compile and isinstance(model, DQTransformer):
        raise ConfigError("--compile is for RQ-Transformers: sample a DQ-Transformer without it")
    sample = sample_dq_codes if isinstance(model, DQTransformer) else sample_codes
    codes, images = [], []
    for s in range(0, cond.shape[0], batch_size):
        c = sample(model, cond[s : s + batch_size], cfg, _part(generator, s, batch_size))
        codes.append(c)
        images.append(vae.decode_codes(c).clamp(-1, 1))
    return torch.cat(codes), torch.cat(images)


def stream_samples(
    vae, model: RQTransformer, cond: Tensor, cfg: SamplingConfig | None, generator,
    batch_size: int, out: str | Path, classes: Sequence[str] = (),
    indices: Sequence[int] | None = None,
) -> Iterator[Tensor]:  # fmt: skip
    """Sample `cond` batch by batch, write each image to OUT/NNNNNN_<class>.png and yield the
    batch: memory stays at one batch however many samples are drawn. `indices` number the
    files (default 0, 1, ...): a torchrun rank drawing its share names them globally."""
    from tqdm import tqdm

    from rqgen.utils.images import save_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(cond.shape[0])) if indices is None else list(indices)
    for s in tqdm(range(0, cond.shape[0], batch_size), desc="sample", leave=False):
        c = cond[s : s + batch_size]
        images = generate(vae, model, c, cfg, _part(generator, s, batch_size), batch_size)[1].cpu()
        for i, (img, k) in enumerate(zip(images, c.tolist())):
            if c.dim() == 2:  # text prompts
                name = "text"
            elif not model.config.num_classes:
                name = "sample"
            else:
                name = classes[k] if k < len(classes) else str(k)
            save_image(img, out / f"{indices[s + i]:06d}_{name}.png")
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
