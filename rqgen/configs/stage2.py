"""Stage-2 experiments: the transformer the user chooses (`ARModelConfig`), how it trains
(`ARTrainConfig`), the presets, and the paper's models (Table 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rqgen.stage2.rq_transformer import RQTransformerConfig


@dataclass
class ARModelConfig:
    """What the user chooses; K, code shape and code dimension come from the RQ-VAE."""

    width: int = 256
    heads: int = 8
    depth_heads: int = 0  # heads of the depth transformer; 0: the same as `heads`
    spatial_layers: int = 8
    depth_layers: int = 4  # 0 with a 16×16×1 VQ: the flat VQ-GAN-style baseline
    # codes per position the transformer models: the first d ≤ D of the tokenizer's stacks
    # (images then decode from Ẑ(d)); 0: all D. One tokenizer serves every rate.
    code_depth: int = 0
    # > 0: dynamic depth (quantize/dynamic.py): round(mean_depth·H·W) codes per image, spent
    # where the residual is largest; a stop code ends the shorter stacks. 0: every stack full
    mean_depth: float = 0.0
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
    # weight). Not the default: on the digits it sampled little better than one-hot
    # training, absolute tau = 0.5 far better (benchmarks/results/digits_soft_labels.md)
    tau_unit: str = "absolute"
    cond_dropout: float = 0.1  # condition replaced by the null one: enables CFG
    val_fraction: float = 0.05
    eval_every: int = 200
    sample_every: int = 500  # a grid of samples (row = class) in OUT/samples and TensorBoard
    patience: int = 0  # early stopping after this many evals without improvement; 0: off
    ema_decay: float = 0.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or fp32, bf16, fp16
    # FSDP2: weights, gradients and AdamW state sharded over every GPU (true), or within
    # each node and replicated across nodes (hybrid, HSDP: the all-gathers stay on NVLink)
    fsdp: Any = False
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: bool = False  # torch.compile the transformer's forward (and so its backward)
    seed: int = 0
    dist_timeout: float = 1800.0  # seconds a collective may wait for a slow or dead rank
    num_workers: int = 0  # training reads stored features (cheap); extraction: see below
    extract_workers: int = -1  # data-loader workers of feature extraction; -1: from the cores
    # views stored per image: 1 the centre crop, 2 centre + mirror, 10 ten-crop (4 corners
    # and centre of the image at 1.125x, each mirrored); any other N up to 64: the centre and
    # N - 1 random crops and flips as stage 1 draws them (image folders); 0: chosen from the
    # folder's size (train/views.py: choose_crops). Training draws one view per epoch.
    feature_crops: int = 0
    features: str = ""  # feature store directory, shared between runs; "": OUT/features
    log_every: int = 10
    ckpt_every: int = 500
    # fine-tuning: start from this transformer's weights (directory or hub repository); a
    # new number of classes re-initialises the class embedding only; "": from scratch
    init_from: str = ""


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
        ARTrainConfig(
            steps=100_000,
            batch_size=128,
            warmup_steps=2000,
            eval_every=2000,
            ckpt_every=2000,
            sample_every=2000,
            precision="auto",
        ),
    )


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
            ARModelConfig(
                width=self.width,
                heads=self.heads,
                spatial_layers=self.spatial_layers,
                depth_layers=self.depth_layers,
                dropout=self.dropout,
                conditioning=self.conditioning,
                text_vocab_size=16384 if text else 4096,
                text_length=32,
            ),
            ARTrainConfig(
                batch_size=self.batch_size, tau=self.tau, patience=5 if self.batch_size == 16 else 0
            ),
        )

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
    "ar-ffhq-370m": PaperModel(355e6, 1024, 16, 24, 4, codebook_size=2048, tau=1.0, batch_size=16),
    "ar-imagenet-480m": PaperModel(480e6, 1536, 24, 12, 4, conditioning="class", num_classes=1000),
    "ar-imagenet-821m": PaperModel(821e6, 1536, 24, 24, 4, conditioning="class", num_classes=1000),
    "ar-imagenet-1.4b": PaperModel(1388e6, 1536, 24, 42, 6, conditioning="class", num_classes=1000),
    # A.3: dropout 0.3 for the 3.8B model only
    "ar-imagenet-3.8b": PaperModel(
        3822e6, 2560, 40, 42, 6, conditioning="class", num_classes=1000, dropout=0.3
    ),
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
    m: ARModelConfig,
    codebook_size: int,
    code_shape: list[int],
    embed_dim: int,
    num_classes: int = 0,
    text_vocab_size: int = 0,
    **extra,
) -> RQTransformerConfig:
    """The RQ-Transformer config for the user's choices `m` and an RQ-VAE's codes."""
    return RQTransformerConfig(
        codebook_size=codebook_size,
        code_shape=list(code_shape),
        embed_dim=embed_dim,
        width=m.width,
        heads=m.heads,
        depth_heads=m.depth_heads,
        spatial_layers=m.spatial_layers,
        depth_layers=m.depth_layers,
        dropout=m.dropout,
        num_classes=num_classes if m.conditioning == "class" else 0,
        text_vocab_size=text_vocab_size if m.conditioning == "text" else 0,
        text_length=m.text_length,
        text_loss_weight=m.text_loss_weight,
        **extra,
    )
