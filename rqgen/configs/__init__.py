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

from rqgen.configs.validate import check_experiment
from rqgen.errors import ConfigError
from rqgen.stage1.dqvae import DQVAEConfig
from rqgen.stage1.rqvae import RQVAEConfig
from rqgen.stage2.rq_transformer import RQTransformerConfig
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
    model = RQVAEConfig(resolution=resolution, ch=64 if resolution == 64 else 128,
                        ch_mult=levels, num_res_blocks=2, attn_resolutions=[8], z_channels=256,
                        embed_dim=256, codebook_size=2048, code_depth=4)  # fmt: skip
    train = VAETrainConfig(steps=100_000, batch_size=64 if resolution == 64 else 32, lr=1e-4,
                           warmup_steps=500, perceptual_weight=1.0, disc_start=20_000,
                           ckpt_every=2000, sample_every=2000)  # fmt: skip
    return VAEExperiment(model, train)


def _imagenet256() -> VAEExperiment:
    # The paper's ImageNet RQ-VAE; layer shapes as the official model (f = 32, 8×8×4).
    return VAEExperiment(RQVAEConfig(), VAETrainConfig())


def _ffhq256() -> VAEExperiment:
    return VAEExperiment(RQVAEConfig(attn_resolutions=[16], codebook_size=2048), VAETrainConfig())


def _dq_tiny32() -> DQVAEExperiment:
    # 32 px: coarse 4×4 (f = 8), fine 8×8 (f = 4); the fine path and the decoder are tiny32's,
    # one more encoder level gives the coarse grid. About 44 codes per image at r = 0.5.
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
    )
    # the recipe tiny32 had before the learning-speed study: the DQ tables were measured
    # with it, and the new one is not measured on DQ-VAE yet
    train = dataclasses.replace(
        _tiny32().train,
        steps=600,
        lr=4e-4,
        beta1=0.5,
        beta2=0.9,
        lr_schedule="constant",
        ckpt_every=200,
        sample_every=200,
    )
    return DQVAEExperiment(model, train)


def _dq_imagenet256() -> DQVAEExperiment:
    # The reference ImageNet DQ-VAE: entropy router, r = 0.5, 16×16 coarse / 32×32 fine,
    # K = 1024 × 256, 3-layer PatchGAN.
    return DQVAEExperiment(DQVAEConfig(), VAETrainConfig(batch_size=32, lr=4.5e-6 * 32,
                                                        disc_layers=3))  # fmt: skip


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


@dataclass
class ARModelConfig:
    """What the user chooses; K, code shape and code dimension come from the RQ-VAE."""

    width: int = 256
    heads: int = 8
    depth_heads: int = 0  # heads of the depth transformer; 0: the same as `heads`
    spatial_layers: int = 8
    depth_layers: int = 4  # 0 with a 16×16×1 VQ: the flat VQ-GAN-style baseline
    position_layers: int = 2  # DQ-Transformer (with a DQ-VAE): position transformer
    content_layers: int = 6  # DQ-Transformer: content transformer
    dropout: float = 0.1
    conditioning: str = "class"  # class | none | text
    text_length: int = 32
    text_vocab_size: int = 4096  # BPE vocabulary trained on the captions
    text_loss_weight: float = 0.1


@dataclass
class ARTrainConfig:
    steps: int = 5000
    batch_size: int = 64  # global
    grad_accum: int = 1
    lr: float = 5e-4  # paper: AdamW(0.9, 0.95), lr 5e-4 cosine, wd 1e-4, clip 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr·min_lr_ratio
    grad_clip: float = 1.0
    soft_labels: bool = True  # targets Q_τ(· | r_{d-1}) instead of one-hot (Eq. 15)
    stochastic_codes: bool = True  # training codes drawn from Q_τ every epoch (Eq. 15)
    tau: float = 0.5
    # the unit of tau: "absolute" is the paper's exp(-||r - e||^2 / tau); "quantization_error"
    # divides the squared distances of depth d by the training features' mean squared
    # distance to their nearest code at d, so that tau means the same on any feature scale
    # (0.5: a code one mean quantization error farther than the nearest gets e^-2 of its
    # weight). Not the default: over 3 seeds on the digits it sampled little better than
    # one-hot training (class accuracy +6 +- 13 points), absolute tau = 0.5 far better
    # (+49 +- 14; benchmarks/results/digits_soft_labels.md)
    tau_unit: str = "absolute"
    cond_dropout: float = 0.1  # condition replaced by the null one: enables CFG
    val_fraction: float = 0.05
    eval_every: int = 200
    sample_every: int = 500  # a grid of samples (row = class) in OUT/samples and TensorBoard
    patience: int = 0  # early stopping after this many evals without improvement; 0: off
    ema_decay: float = 0.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or fp32, bf16, fp16
    fsdp: bool = False  # FSDP2: weights, gradients and AdamW state sharded over the GPUs
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: bool = False  # torch.compile the transformer's forward (and so its backward)
    seed: int = 0
    dist_timeout: float = 1800.0  # seconds a collective may wait for a slow or dead rank
    num_workers: int = 0  # training reads stored features (cheap); extraction: see below
    extract_workers: int = -1  # data-loader workers of feature extraction; -1: from the cores
    # views stored per image: 1 the centre crop, 2 centre + mirror, 10 ten-crop (4 corners
    # and centre of the image at 1.125x, each mirrored); training draws one per epoch
    feature_crops: int = 1
    features: str = ""  # feature store directory, shared between runs; "": OUT/features
    log_every: int = 10
    ckpt_every: int = 500


@dataclass
class ARExperiment:
    model: ARModelConfig = field(default_factory=ARModelConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)


def _ar_tiny() -> ARExperiment:
    return ARExperiment(
        ARModelConfig(width=128, heads=4, spatial_layers=4, depth_layers=2, dropout=0.1),
        ARTrainConfig(steps=1500, batch_size=64, lr=1e-3, warmup_steps=50, eval_every=100),
    )


def _ar_flat_tiny() -> ARExperiment:
    # The flat baseline: every layer spatial (use with a 16×16×1 VQ).
    return ARExperiment(
        ARModelConfig(width=128, heads=4, spatial_layers=6, depth_layers=0, dropout=0.1),
        _ar_tiny().train,
    )


def _ar_consumer(width: int, heads: int, spatial_layers: int) -> ARExperiment:
    # Stage 2 for rq64 / rq128 codes on one consumer GPU: the paper's recipe (soft labels,
    # stochastic codes, AdamW 5e-4 cosine) at a width that trains in a day.
    return ARExperiment(
        ARModelConfig(width=width, heads=heads, spatial_layers=spatial_layers, depth_layers=4),
        ARTrainConfig(steps=100_000, batch_size=128, warmup_steps=2000, eval_every=2000,
                      ckpt_every=2000, sample_every=2000, precision="auto"),
    )  # fmt: skip


def _dq_ar_tiny() -> ARExperiment:
    # DQ-Transformer for dq-tiny32 codes: 2 position + 4 content layers (the reference's 1:3
    # split), hard codes (DQ-VAE has no residual depth for soft labels).
    exp = _ar_tiny()
    exp.model.position_layers, exp.model.content_layers = 2, 4
    exp.train.soft_labels = exp.train.stochastic_codes = False
    return exp


@dataclass(frozen=True)
class PaperModel:
    """A stage-2 model of the paper's Table 5: its layers, and the RQ-VAE (8×8×4 codes of
    dimension 256, K codes) and conditions it was trained with, which fix its size."""

    params: float  # as Table 5 reports it
    width: int
    heads: int
    spatial_layers: int
    depth_layers: int
    codebook_size: int = 16384
    conditioning: str = "none"
    num_classes: int = 0
    tau: float = 0.5
    dropout: float = 0.1
    batch_size: int = 2048  # A.3: 2048, 16 for FFHQ

    def experiment(self) -> ARExperiment:
        # A.3: AdamW(0.9, 0.95), lr 5e-4 cosine, wd 1e-4, clip 1.0 (ARTrainConfig defaults)
        text = self.conditioning == "text"
        return ARExperiment(
            ARModelConfig(width=self.width, heads=self.heads, spatial_layers=self.spatial_layers,
                          depth_layers=self.depth_layers, dropout=self.dropout,
                          conditioning=self.conditioning, text_vocab_size=16384 if text else 4096,
                          text_length=32),
            ARTrainConfig(batch_size=self.batch_size, tau=self.tau,
                          patience=5 if self.batch_size == 16 else 0),
        )  # fmt: skip

    def transformer_config(self) -> RQTransformerConfig:
        """The full model config, as `train-ar` would build it from the paper's RQ-VAE."""
        m = self.experiment().model
        return ar_transformer_config(
            m,
            self.codebook_size,
            [8, 8, 4],
            256,
            self.num_classes,
            m.text_vocab_size if self.conditioning == "text" else 0,
        )


# Table 5 of the paper; layer splits and heads agree with the released configs (CC-3M: 26+4,
# where the table's text extraction reads 24). FFHQ: Table 5 prints 370M, but its K = 2048
# gives 354M, the size of the released FFHQ model (355M).
PAPER_MODELS = {
    "ar-lsun-cat-612m": PaperModel(612e6, 1280, 20, 26, 4),
    "ar-lsun-bedroom-612m": PaperModel(612e6, 1280, 20, 26, 4),
    "ar-lsun-church-370m": PaperModel(370e6, 1024, 16, 24, 4),
    "ar-ffhq-370m": PaperModel(
        355e6, 1024, 16, 24, 4, codebook_size=2048, tau=1.0, batch_size=16
    ),  # fmt: skip
    "ar-imagenet-480m": PaperModel(480e6, 1536, 24, 12, 4, conditioning="class", num_classes=1000),
    "ar-imagenet-821m": PaperModel(821e6, 1536, 24, 24, 4, conditioning="class", num_classes=1000),
    "ar-imagenet-1.4b": PaperModel(
        1388e6, 1536, 24, 42, 6, conditioning="class", num_classes=1000
    ),  # fmt: skip
    # A.3: dropout 0.3 for the 3.8B model only
    "ar-imagenet-3.8b": PaperModel(
        3822e6, 2560, 40, 42, 6, conditioning="class", num_classes=1000, dropout=0.3
    ),  # fmt: skip
    "ar-cc3m-654m": PaperModel(654e6, 1280, 20, 26, 4, conditioning="text"),
}

AR_PRESETS = {
    "ar-tiny": _ar_tiny,
    "ar-64": lambda: _ar_consumer(512, 8, 12),
    "ar-128": lambda: _ar_consumer(768, 12, 16),
    "dq-ar-tiny": _dq_ar_tiny,
    "ar-flat-tiny": _ar_flat_tiny,
    **{name: paper.experiment for name, paper in PAPER_MODELS.items()},
    # the reference ImageNet DQ-Transformer: 6 + 18 layers, width 1024, 8 heads (~309M)
    "dq-ar-imagenet": lambda: ARExperiment(
        ARModelConfig(width=1024, heads=8, position_layers=6, content_layers=18),
        ARTrainConfig(weight_decay=0.01, soft_labels=False, stochastic_codes=False),
    ),
}


def ar_transformer_config(
    m: ARModelConfig, codebook_size: int, code_shape: list[int], embed_dim: int,
    num_classes: int = 0, text_vocab_size: int = 0, **extra,
) -> RQTransformerConfig:  # fmt: skip
    """The RQ-Transformer config for the user's choices `m` and an RQ-VAE's codes."""
    return RQTransformerConfig(
        codebook_size=codebook_size, code_shape=list(code_shape), embed_dim=embed_dim,
        width=m.width, heads=m.heads, depth_heads=m.depth_heads, spatial_layers=m.spatial_layers,
        depth_layers=m.depth_layers, dropout=m.dropout,
        num_classes=num_classes if m.conditioning == "class" else 0,
        text_vocab_size=text_vocab_size if m.conditioning == "text" else 0,
        text_length=m.text_length, text_loss_weight=m.text_loss_weight, **extra,
    )  # fmt: skip


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
                raise ConfigError(f"{config} must hold model: and train: sections, not "
                                  f"{type(raw).__name__}")  # fmt: skip
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
