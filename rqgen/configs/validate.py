"""One validation layer for every config field of both stages: ranges, choices, and the
relations between fields (width by heads, resolution by the downsampling factor), checked
when a config is loaded, before anything is read or written.

Every field of every config dataclass has a rule here (a test enforces it), so a field
added later cannot slip through unvalidated. Messages name the field, the value and what is
allowed: `model.code_depth=0: must be an integer ≥ 1`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rqgen.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one field accepts. `low`/`high` bound numbers (and list items); `open_low` /
    `open_high` exclude the bound; `choices` lists allowed strings."""

    kind: str  # int, float, bool, str, ints (list of int), choice
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    min_items: int = 0

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(
                str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices
            )
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            return "a string"
        noun = {"int": "an integer", "float": "a number", "ints": "a list of integers"}[self.kind]
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.open_low else '≥'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.open_high else '≤'} {self.high:g}")
        bound = " and ".join(parts)
        if self.kind == "ints":
            items = f"{self.min_items}+ items" if self.min_items else "items"
            return f"{noun} ({items}{', each ' + bound if bound else ''})"
        return f"{noun}{' ' + bound if bound else ''}"

    def _in_range(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.open_high else v > self.high))

    def accepts(self, v) -> bool:
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str)
        if self.kind == "choice":
            return v in self.choices
        if self.kind == "ints":
            return (
                isinstance(v, list)
                and len(v) >= self.min_items
                and all(
                    isinstance(x, int) and not isinstance(x, bool) and self._in_range(x) for x in v
                )
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind == "int" and not isinstance(v, int):
            return False
        return self._in_range(v)

    def bad_example(self):
        """A value this rule refuses (for the test that walks every field)."""
        if self.kind in ("bool", "str"):
            return None
        if self.kind == "choice":
            return "nonsense"
        if self.kind == "ints":
            return [] if self.min_items else [int(self.low) - 1 if self.low is not None else -1]
        if self.low is not None:
            return type(1 if self.kind == "int" else 1.0)(self.low - (0 if self.open_low else 1))
        return type(1 if self.kind == "int" else 1.0)(self.high + (0 if self.open_high else 1))


def count(low: int = 1) -> Rule:
    return Rule("int", low=low)


def positive() -> Rule:
    return Rule("float", low=0, open_low=True)


def non_negative() -> Rule:
    return Rule("float", low=0)


def unit(open_high: bool = True, open_low: bool = False) -> Rule:
    """A fraction: in [0, 1) by default."""
    return Rule("float", low=0, high=1, open_low=open_low, open_high=open_high)


PRECISION = Rule("choice", choices=("auto", "fp32", "bf16", "fp16"))
FLAG, TEXT = Rule("bool"), Rule("str")
FSDP = Rule("choice", choices=(False, True, "hybrid"))
LEVELS = Rule("ints", low=1, min_items=1)  # channel multipliers
RESOLUTIONS = Rule("ints", low=1)  # attention resolutions (may be empty)

_AUTOENCODER = {
    "resolution": count(8),
    "in_channels": count(),
    "ch": count(),
    "ch_mult": LEVELS,
    "num_res_blocks": count(0),
    "attn_resolutions": RESOLUTIONS,
    "dropout": unit(),
    "z_channels": count(),
    "embed_dim": count(),
    "codebook_size": count(2),
    "decay": unit(open_low=True),
    "commitment_weight": non_negative(),
    "restart_unused_codes": FLAG,
    "gradient_estimator": Rule("choice", choices=("ste", "rotation", "rotation_per_depth")),
}

_TRAINING = {  # what both stages' training configs share
    "steps": count(),
    "batch_size": count(),
    "grad_accum": count(),
    "lr": positive(),
    "beta1": unit(),
    "beta2": unit(),
    "warmup_steps": count(0),
    "grad_clip": non_negative(),
    "ema_decay": unit(),
    "precision": PRECISION,
    "seed": count(0),
    "dist_timeout": positive(),
    "num_workers": count(-1),
    "log_every": count(),
    "ckpt_every": count(),
}

RULES: dict[str, dict[str, Rule]] = {
    "RQVAEConfig": _AUTOENCODER
    | {
        "code_depth": count(),
        "shared_codebook": FLAG,
        "norm_groups": count(0),
        "zero_init_residual": FLAG,
        "patch_shortcut": FLAG,
        "quantize_dropout": FLAG,
        "quantize_dropout_depths": Rule("ints", low=1),
        "depth_scale": FLAG,
        "commitment": Rule("choice", choices=("all", "final")),
    },
    "DQVAEConfig": _AUTOENCODER
    | {
        "ch_mult": Rule("ints", low=1, min_items=2),
        "decoder_ch_mult": LEVELS,
        "decoder_attn_resolutions": RESOLUTIONS,
        "router": Rule("choice", choices=("entropy", "learned")),
        "fine_fraction": unit(open_low=True),
        "budget_weight": non_negative(),
        "entropy_bins": count(2),
        "zero_init_residual": FLAG,
        "patch_shortcut": FLAG,
    },
    "VAETrainConfig": _TRAINING
    | {
        "adam_eps": positive(),
        "perceptual_weight": non_negative(),
        "adversarial_weight": non_negative(),
        "disc_start": count(0),
        "disc_ndf": count(),
        "disc_layers": count(),
        "sample_every": count(),
        "val_batches": count(0),
        "lr_schedule": Rule("choice", choices=("constant", "cosine")),
        "init_from": TEXT,
        "freeze_codebook": FLAG,
    },
    "ARModelConfig": {
        "width": count(),
        "heads": count(),
        "depth_heads": count(0),
        "spatial_layers": count(),
        "depth_layers": count(0),
        "code_depth": count(0),
        "mean_depth": non_negative(),
        "position_layers": count(),
        "content_layers": count(),
        "dropout": unit(),
        "conditioning": Rule("choice", choices=("class", "none", "text")),
        "text_length": count(2),
        "text_vocab_size": count(8),
        "text_loss_weight": unit(),
    },
    "ARTrainConfig": _TRAINING
    | {
        "weight_decay": non_negative(),
        "min_lr_ratio": unit(open_high=False),
        "soft_labels": FLAG,
        "stochastic_codes": FLAG,
        "tau": positive(),
        "cond_dropout": unit(),
        "tau_unit": Rule("choice", choices=("quantization_error", "absolute")),
        "val_fraction": unit(),
        "eval_every": count(),
        "patience": count(0),
        "fsdp": FSDP,
        "sample_every": count(),
        "activation_checkpointing": FLAG,
        "compile": FLAG,
        "extract_workers": count(-1),
        "feature_crops": Rule("int", low=0, high=64),
        "features": Rule("str"),
        "init_from": TEXT,
    },
}


def check_fields(obj, section: str) -> None:
    """Every field of the dataclass `obj` against its rule; `section` prefixes the names
    in messages (model, train)."""
    rules = RULES[type(obj).__name__]
    for f in dataclasses.fields(obj):
        rule, value = rules[f.name], getattr(obj, f.name)
        if not rule.accepts(value):
            raise ConfigError(f"{section}.{f.name}={_show(value)}: must be {rule.describe()}")


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace(" ", "")


def check_experiment(exp) -> None:
    """Fields one by one, then the relations between them; raises ConfigError."""
    check_fields(exp.model, "model")
    check_fields(exp.train, "train")
    m, t = exp.model, exp.train
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}"
        )
    if hasattr(m, "resolution"):
        _check_autoencoder(m)
    else:
        _check_transformer(m)


def _check_autoencoder(m) -> None:
    factor = 2 ** (len(m.ch_mult) - 1)
    if m.resolution % factor:
        raise ConfigError(
            f"model.resolution={m.resolution} must be divisible by the downsampling factor "
            f"{factor} (2^(len(model.ch_mult) - 1)): use a multiple of {factor}"
        )
    reached = {m.resolution // 2**i for i in range(len(m.ch_mult))}
    unused = sorted(set(m.attn_resolutions) - reached)
    if unused:
        levels = sorted(reached, reverse=True)
        raise ConfigError(
            f"model.attn_resolutions={_show(m.attn_resolutions)}: {unused} is not "
            f"a resolution of the encoder ({levels})"
        )
    if hasattr(m, "decoder_ch_mult") and len(m.decoder_ch_mult) != len(m.ch_mult) - 1:
        raise ConfigError(
            f"model.decoder_ch_mult={_show(m.decoder_ch_mult)} needs {len(m.ch_mult) - 1} levels "
            f"(one fewer than model.ch_mult) so that it starts from the fine grid"
        )
    drop = getattr(m, "quantize_dropout_depths", [])
    if drop and (not m.quantize_dropout or max(drop) > m.code_depth):
        raise ConfigError(
            f"model.quantize_dropout_depths={_show(drop)} needs model.quantize_dropout=true "
            f"and depths ≤ model.code_depth={m.code_depth}"
        )
    groups = getattr(m, "norm_groups", 0)
    if groups:
        bad = [m.ch * k for k in m.ch_mult if (m.ch * k) % groups]
        if bad:
            raise ConfigError(
                f"model.norm_groups={groups} does not divide {bad[0]} channels "
                "(model.ch × model.ch_mult): use 0 (automatic) or a divisor"
            )


def _check_transformer(m) -> None:
    for name, heads in (("heads", m.heads), ("depth_heads", m.depth_heads)):
        if heads and m.width % heads:
            raise ConfigError(f"model.width={m.width} must be divisible by model.{name}={heads}")


def check_run(exp, world_size: int, captions: str | None = None) -> None:
    """What an experiment asks of the run: a batch that splits over the processes, captions
    only for text models, FSDP without a weight EMA."""
    m, t = exp.model, exp.train
    if t.batch_size % (world_size * t.grad_accum):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by processes × grad_accum "
            f"= {world_size} × {t.grad_accum}"
        )
    conditioning = getattr(m, "conditioning", None)
    if conditioning is None:  # an autoencoder
        if t.freeze_codebook and not t.init_from:
            raise ConfigError(
                "train.freeze_codebook keeps a trained codebook: give "
                "train.init_from=DIR (or drop train.freeze_codebook)"
            )
        return
    if t.init_from and conditioning == "text":
        raise ConfigError(
            "train.init_from is not supported for text-conditional models yet "
            "(the caption tokenizer is trained anew): train from scratch"
        )
    if conditioning not in ("class", "none", "text"):
        raise ConfigError(f"model.conditioning={conditioning!r}: use class, none or text")
    if captions and conditioning != "text":
        raise ConfigError(
            f"--captions is for text-conditional models, and this one is "
            f"model.conditioning={conditioning}: add model.conditioning=text "
            "or drop --captions"
        )
    if t.fsdp and t.ema_decay > 0:
        raise ConfigError(
            "train.ema_decay is not supported with train.fsdp yet: set "
            "train.ema_decay=0, or train without FSDP"
        )


def check_family(exp, family) -> None:
    """A transformer experiment against the family of the VAE it models (rqgen.family)."""
    m, t = exp.model, exp.train
    if m.conditioning == "text" and not family.text:
        raise ConfigError(
            f"{family.name}-Transformer is class-conditional or unconditional: "
            "use model.conditioning=class or none"
        )
    if not family.residual and m.mean_depth:
        raise ConfigError(
            f"model.mean_depth is for RQ-VAE codes; a {family.name}-VAE varies its "
            "granularity itself: drop model.mean_depth"
        )
    if not family.residual and (t.soft_labels or t.stochastic_codes):
        raise ConfigError(
            f"a {family.name}-VAE gives one code per cell: set train.soft_labels=false "
            "train.stochastic_codes=false (or use --config dq-ar-tiny)"
        )
