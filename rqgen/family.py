"""The two model families, and everything in which they differ, in one place.

RQ: an RQ-VAE's (H, W, D) residual code stacks, modelled by an RQ-Transformer (spatial +
depth transformer, soft labels and stochastic codes of Eq. 15, text or class conditions).
DQ: a DQ-VAE's code map of dynamic granularity, flattened into token streams and modelled
by a DQ-Transformer (position + content transformer, hard codes, class conditions).

Code outside this module asks `family_of(model)` (a VAE, a transformer, either's config or
model_type) and calls what it holds; no `isinstance` on the model classes elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from rqgen.configs.stage2 import ARModelConfig, ar_transformer_config
from rqgen.errors import CheckpointError, ConfigError
from rqgen.stage1.dqvae import DQVAE, DQVAEConfig
from rqgen.stage1.rqvae import RQVAE, RQVAEConfig
from rqgen.stage2.dq_sampling import sample_dq_codes
from rqgen.stage2.dq_transformer import DQTransformer, DQTransformerConfig
from rqgen.stage2.guidance import SamplingConfig
from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig, codebook_fingerprint
from rqgen.stage2.sampling import sample_codes
from rqgen.stage2.speculative import sample_codes_speculative


@dataclass(frozen=True)
class Family:
    """What a family is made of, and what it can do."""

    name: str  # "RQ" | "DQ": RQ-VAE / RQ-Transformer, DQ-VAE / DQ-Transformer
    vae: type[nn.Module]
    vae_config: type
    transformer: type[nn.Module]
    transformer_config: type
    residual: bool  # codes have a residual depth: coarse-to-fine Ẑ(d), soft labels (Eq. 15)
    text: bool  # the transformer can be text-conditional
    compiled_sampling: bool  # a fixed-shape, compiled sampler exists

    @property
    def types(self) -> tuple[str, str]:
        """The model_type of the VAE and of the transformer."""
        return self.vae.model_type, self.transformer.model_type

    def code_depth(self, vae, m: ARModelConfig | None = None) -> int:
        """Codes per position the transformer models (1: one code per token): all D of the
        tokenizer's, or the prefix `m.code_depth` asks for."""
        full = vae.quantizer.depth if self.residual else 1
        d = m.code_depth if m is not None and m.code_depth else full
        if d > full:
            what = f"{full} codes per position" if self.residual else "one code per token"
            raise ConfigError(
                f"model.code_depth={d}, but the {self.name}-VAE has {what}: choose "
                f"model.code_depth in 1..{full} (0 for all)"
            )
        mean = m.mean_depth if m is not None else 0
        if mean and not 1 <= mean <= d:
            raise ConfigError(
                f"model.mean_depth={mean:g}: a stack holds 1..{d} codes, so choose a mean "
                f"depth in 1..{d} (0: every stack full)"
            )
        return d

    def conditioning(self, config) -> str:
        """class | text | none, from a transformer config."""
        if self.text and config.text_vocab_size:
            return "text"
        return "class" if config.num_classes else "none"

    def build(self, m: ARModelConfig, vae, num_classes: int, tokenizer=None) -> nn.Module:
        """A fresh transformer for the user's choices `m` over `vae`'s codes."""
        if not self.residual:
            return DQTransformer.for_vae(
                vae,
                width=m.width,
                heads=m.heads,
                position_layers=m.position_layers,
                content_layers=m.content_layers,
                dropout=m.dropout,
                num_classes=num_classes,
            )
        q, text, d = vae.quantizer, m.conditioning == "text", self.code_depth(vae, m)
        table = q.code_table() if q.shared_table else q.code_table()[:d]
        config = ar_transformer_config(
            m,
            q.codebook_size,
            [*vae.config.code_shape[:2], d],
            q.dim,
            num_classes,
            tokenizer.vocab_size if text else 0,
            shared_codebook=q.shared_table,
            vae_fingerprint=codebook_fingerprint(q.codebook),
            text_pad_id=tokenizer.pad_id if text else 0,
            stop_code=m.mean_depth > 0,
        )
        return RQTransformer(config, table)

    def sample(self, model, cond: Tensor, sampling: SamplingConfig, generator) -> Tensor:
        """Code maps for conditions `cond`: (B, H, W, D), or packed DQ maps (B, 2Hc, 2Hc, 2)."""
        if self.residual and sampling.speculative:
            return sample_codes_speculative(model, cond, sampling, generator)[0]
        if self.residual:
            return sample_codes(model, cond, sampling, generator)
        if sampling.speculative:
            raise ConfigError("--speculative is for RQ-Transformers: sample without it")
        return sample_dq_codes(model, cond, sampling, generator)

    def describe(self, model) -> str:
        c, n = model.config, sum(p.numel() for p in model.parameters())
        if self.residual:
            return (
                f"RQ-Transformer ({n / 1e6:.1f}M params, {c.spatial_layers}+"
                f"{c.depth_layers} layers, width {c.width})"
            )
        return (
            f"DQ-Transformer ({n / 1e6:.1f}M params, {c.position_layers}+"
            f"{c.content_layers} layers, width {c.width})"
        )


RQ = Family("RQ", RQVAE, RQVAEConfig, RQTransformer, RQTransformerConfig, True, True, True)
DQ = Family("DQ", DQVAE, DQVAEConfig, DQTransformer, DQTransformerConfig, False, False, False)
FAMILIES = (RQ, DQ)


def family_of(thing) -> Family:
    """The family of a VAE, a transformer, either's config (or experiment), or a model_type."""
    if isinstance(thing, str):
        for f in FAMILIES:
            if thing in f.types:
                return f
        raise CheckpointError(
            f"{thing!r} is not a model of rqgen: expected one of "
            f"{', '.join(t for f in FAMILIES for t in f.types)}"
        )
    kind = type(thing)
    for f in FAMILIES:
        if issubclass(kind, (f.vae, f.transformer, f.vae_config, f.transformer_config)):
            return f
    model = getattr(thing, "model", None)  # an experiment: its model config
    if model is not None and not isinstance(model, nn.Module):
        return family_of(model)
    raise TypeError(f"{kind.__name__} belongs to no model family")
