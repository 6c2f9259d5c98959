"""Presets and config loading: `--config PRESET|FILE` plus `key=value` overrides.

A stage-1 experiment is two dataclasses, `model` (saved with the weights) and `train` (saved
next to the training state). Files may be JSON or YAML with the same two sections; overrides
use dotted keys: `model.code_depth=8 train.lr=1e-4`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rqgen.configs.stage2 import (  # noqa: F401 (the stage-2 configs, re-exported)
    AR_PRESETS,
    PAPER_MODELS,
    ARExperiment,
    ARModelConfig,
    ARTrainConfig,
    PaperModel,
    ar_transformer_config,
)
from rqgen.configs.validate import check_experiment
from rqgen.errors import ConfigError
from rqgen.stage1.dqvae import DQVAEConfig
from rqgen.stage1.rqvae import RQVAEConfig
from rqgen.utils.files import read_yaml


@dataclass
class VAETrainConfig:
    steps: int = 20_000
    batch_size: int = 128  # GLOBAL batch: split over ranks and gradient-accumulation steps
    grad_accum: int = 1
    lr: float = 4e-5  # paper: Adam(0.5, 0.9), lr 4e-5, no decay, no weight decay
    beta1: float = 0.5
    beta2: float = 0.9
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: constant (the paper) or cosine (to 0)
    grad_clip: float = 0.0  # 0: off
    perceptual_weight: float = 1.0  # LPIPS (needs local VGG16 weights; 0 turns it off)
    adversarial_weight: float = 0.75  # PatchGAN hinge loss, times the adaptive weight
    disc_start: int = 0  # step at which the GAN losses switch on
    disc_ndf: int = 64
    disc_layers: int = 2
    ema_decay: float = 0.0  # weight EMA of the autoencoder; 0: off
    # auto: bf16 on CUDA, fp32 on CPU; fp16 adds a gradient scaler. The codebook search
    # and its EMA statistics run in fp32 whatever this says.
    precision: str = "auto"
    seed: int = 0
    dist_timeout: float = 1800.0  # seconds a collective may wait for a slow or dead rank
    num_workers: int = -1  # data-loader workers; -1: from the cores available (cpu_budget)
    log_every: int = 10
    ckpt_every: int = 500
    sample_every: int = 500
    val_batches: int = 4  # held-out global micro-batches scored each sample_every, split over ranks
    # fine-tuning: start from this model's weights (a directory or hub repository, an rqgen
    # or converted official model) with a fresh optimizer and schedule; "": from scratch
    init_from: str = ""
    freeze_codebook: bool = False  # keep the codebook fixed: transformers on it stay valid


@dataclass
class VAEExperiment:
    model: RQVAEConfig = field(default_factory=RQVAEConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    model_type: str = "rqvae"


@dataclass
class DQVAEExperiment:
    """A DQ-VAE run; config files select it with `model_type: dqvae`."""

    model: DQVAEConfig = field(default_factory=DQVAEConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    model_type: str = "dqvae"


def _tiny32() -> VAEExperiment:
    # 32 px -> 8×8×4 with f = 4: the paper's code shape (T = 64, D = 4) at CPU scale.
    model = RQVAEConfig(
        resolution=32,
        ch=32,
        ch_mult=[1, 2, 4],
        num_res_blocks=1,
        attn_resolutions=[],
        z_channels=64,
        embed_dim=64,
        codebook_size=512,
        code_depth=4,
        zero_init_residual=True,
        # Departs from the paper: a linear path from each 4×4 pixel patch to its code vector
        # and back (PatchShortcut). Quantized at 8×8×4 on held-out photos it reaches 29.98 dB
        # after 300 steps where the paper's architecture had 24.5 dB (stage1_learning.md).
        patch_shortcut=True,
    )
    # No VGG16 weights exist on a fresh machine, so LPIPS is off; the GAN starts late, after
    # the MSE has converged (a GAN on a barely trained decoder only adds noise). Without the
    # GAN the paper's Adam(0.5, 0.9) only slows the MSE down: (0.9, 0.99), lr 1e-3 with a
    # cosine decay and zero-initialised residual branches learn fastest of what was measured
    # (benchmarks/results/stage1_learning.md).
    train = VAETrainConfig(
        steps=1000,
        batch_size=64,
        lr=1e-3,
        beta1=0.9,
        beta2=0.99,
        warmup_steps=50,
        lr_schedule="cosine",
        perceptual_weight=0.0,
        adversarial_weight=0.75,
        disc_start=5000,
        disc_ndf=32,
        ckpt_every=250,
        sample_every=250,
    )
    return VAEExperiment(model, train)


def _rq_consumer(resolution: int) -> VAEExperiment:
    # One consumer GPU (e.g. 24 GB): the paper's 8×8×4 codes at 64 px (f = 8) or 128 px
    # (f = 16), at a quarter (64 px, 6.6M params) or a half (128 px, 72M) of the paper's
    # channel width, attention at the 8×8 latent. LPIPS and the PatchGAN are on as in the
    # paper (LPIPS needs the VGG16 files, see the README; or train.perceptual_weight=0).
    levels = {64: [1, 1, 2, 2], 128: [1, 1, 2, 2, 4]}[resolution]
    model = RQVAEConfig(
        resolution=resolution,
        ch=64 if resolution == 64 else 128,
        ch_mult=levels,
        num_res_blocks=2,
        attn_resolutions=[8],
        z_channels=256,
        embed_dim=256,
        codebook_size=2048,
        code_depth=4,
    )
    train = VAETrainConfig(
        steps=100_000,
        batch_size=64 if resolution == 64 else 32,
        lr=1e-4,
        warmup_steps=500,
        perceptual_weight=1.0,
        disc_start=20_000,
        ckpt_every=2000,
        sample_every=2000,
    )
    return VAEExperiment(model, train)


def _imagenet256() -> VAEExperiment:
    # The paper's ImageNet RQ-VAE; layer shapes as the official model (f = 32, 8×8×4).
    return VAEExperiment(RQVAEConfig(), VAETrainConfig())


def _ffhq256() -> VAEExperiment:
    return VAEExperiment(RQVAEConfig(attn_resolutions=[16], codebook_size=2048), VAETrainConfig())


def _dq_tiny32() -> DQVAEExperiment:
    # 32 px: coarse 4×4 (f = 8), fine 8×8 (f = 4); the fine path and the decoder are tiny32's,
    # one more encoder level gives the coarse grid. About 44 codes per image at r = 0.5.
    # tiny32's recipe (zero-initialised branches, the patch shortcut on the fine grid, its
    # optimiser and schedule); benchmarks/results/dq_rate_distortion.md compares it at equal
    # tokens with fixed-length codes.
    model = DQVAEConfig(
        resolution=32,
        ch=32,
        ch_mult=[1, 2, 4, 4],
        decoder_ch_mult=[1, 2, 4],
        num_res_blocks=1,
        attn_resolutions=[],
        decoder_attn_resolutions=[],
        z_channels=64,
        embed_dim=64,
        codebook_size=512,
        zero_init_residual=True,
        patch_shortcut=True,
    )
    return DQVAEExperiment(model, _tiny32().train)


def _dq_imagenet256() -> DQVAEExperiment:
    # The reference ImageNet DQ-VAE: entropy router, r = 0.5, 16×16 coarse / 32×32 fine,
    # K = 1024 × 256, 3-layer PatchGAN.
    return DQVAEExperiment(
        DQVAEConfig(), VAETrainConfig(batch_size=32, lr=4.5e-6 * 32, disc_layers=3)
    )


PRESETS = {
    "tiny32": _tiny32,
    "rq64": lambda: _rq_consumer(64),
    "rq128": lambda: _rq_consumer(128),
    "imagenet256": _imagenet256,
    "ffhq256": _ffhq256,
    "dq-tiny32": _dq_tiny32,
    "dq-imagenet256": _dq_imagenet256,
}


# ---------------------------------------------------------------------------- stage 2


def load_vae_experiment(
    config: str | None, overrides: list[str] | None = None
) -> VAEExperiment | DQVAEExperiment:
    """Preset name or JSON/YAML file, then dotted overrides, validated against the dataclasses.
    A file with `model_type: dqvae` describes a DQ-VAE."""
    default = VAEExperiment
    if config and config not in PRESETS and Path(config).is_file():
        raw = read_yaml(config)
        kind = raw.get("model_type", "rqvae") if isinstance(raw, dict) else None
        if kind not in ("rqvae", "dqvae"):
            raise ConfigError(f"{config}: model_type {kind!r} is not rqvae or dqvae")
        default = DQVAEExperiment if kind == "dqvae" else VAEExperiment
    return _load(config or "tiny32", PRESETS, default, overrides)


def load_ar_experiment(config: str | None, overrides: list[str] | None = None) -> ARExperiment:
    return _load(config or "ar-tiny", AR_PRESETS, ARExperiment, overrides)


def _load(config: str, presets: dict, default, overrides: list[str] | None):
    if config in presets:
        base = presets[config]()
    elif Path(config).is_file():
        base = default()
    else:
        raise ConfigError(
            f"--config {config!r} is neither a preset ({', '.join(presets)}) nor a file"
        )
    try:
        cfg = OmegaConf.structured(base)
        if config not in presets:
            raw = read_yaml(config)
            if not isinstance(raw, dict):
                raise ConfigError(
                    f"{config} must hold model: and train: sections, not {type(raw).__name__}"
                )
            cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. train.lr=1e-4)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        exp = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad config value{f' for {key}' if key else ''}: {msg}") from e
    check_experiment(exp)  # ranges and relations of every field, before any work
    return exp


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
