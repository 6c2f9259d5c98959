"""DQ-Transformer (Huang et al., CVPR 2023): coarse-to-fine generation of a DQ-VAE code map,
predicting at every step the POSITION of the next code and then its CONTENT.

Two causal transformers in series over the sequence of `dq_sequence` (t = 0 .. L-2):

    x_t = E_content(c_t) + E_pos[s_t](p_t) + P_abs(t) + E_seg(s_t)
    h_t = PositionTransformer(x_≤t)          -> logits of p_{t+1} (coarse or fine head)
    y_t = h_t + E_pos[s_{t+1}](p_{t+1})      (teacher-forced next position)
    g_t = ContentTransformer(y_≤t)           -> logits of c_{t+1}

One content embedding serves both granularities; coarse and fine positions have their own
embeddings and heads. Class models replace both SOS tokens by the class embedding (the null
class, last row, is the unconditional start token and classifier-free guidance's null).

    loss = CE(content) + ½·[CE(coarse positions) + CE(fine positions)], pads ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.checkpoint import Pretrained
from rqgen.errors import ConfigError
from rqgen.stage2.block import RowLinear, Transformer, gpt_init
from rqgen.stage2.dq_sequence import DQSequence, DQVocab
from rqgen.stage2.rq_transformer import check_class_ids, check_pairing, codebook_fingerprint


@dataclass
class DQTransformerConfig:
    codebook_size: int = 1024  # K of the DQ-VAE
    coarse_size: int = 16  # Hc; the fine grid is 2Hc × 2Hc
    width: int = 1024
    heads: int = 8
    position_layers: int = 6
    content_layers: int = 18
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional
    vae_fingerprint: str = ""  # hash of the DQ-VAE codebook the model was trained on

    @property
    def vocab(self) -> DQVocab:
        return DQVocab(self.codebook_size, self.coarse_size)

    @property
    def max_length(self) -> int:
        """Longest sequence: every region fine, 4·Nc codes + 4 special tokens."""
        return 4 * self.coarse_size**2 + 4


class DQTransformer(nn.Module, Pretrained):
    model_type = "dq_transformer"
    conditions_checked = False  # set by a trainer that checked its labels (as RQTransformer)
    config_class = DQTransformerConfig

    def __init__(self, config: DQTransformerConfig):
        super().__init__()
        self.config = c = config
        v, C = c.vocab, c.width
        self.content_emb = nn.Embedding(c.codebook_size + 3, C)  # codes, PAD, EOS, SOS
        self.cond_emb = nn.Embedding(c.num_classes + 1, C)  # classes, then the null class
        self.coarse_pos_emb = nn.Embedding(v.n_coarse + 3, C)  # cells, PAD, EOS, SOS
        self.fine_pos_emb = nn.Embedding(v.n_fine + 3, C)
        self.abs_pos_emb = nn.Parameter(torch.zeros(1, c.max_length, C))
        self.seg_emb = nn.Embedding(2, C)
        self.embed_drop = nn.Dropout(c.dropout)
        self.position_transformer = Transformer(C, c.position_layers, c.heads, c.dropout)
        self.content_transformer = Transformer(C, c.content_layers, c.heads, c.dropout)
        self.coarse_pos_head = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, v.n_coarse + 3))
        self.fine_pos_head = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, v.n_fine + 3))
        self.content_head = nn.Sequential(nn.LayerNorm(C), RowLinear(C, c.codebook_size + 3))
        gpt_init(self, c.position_layers + c.content_layers)
        nn.init.normal_(self.abs_pos_emb, 0.0, 0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ pieces
    def check_cond(self, cond: Tensor) -> None:
        if not self.conditions_checked:
            check_class_ids(cond, self.config.num_classes)

    def position_embedding(self, position: Tensor, segment: Tensor) -> Tensor:
        """E_pos[s](p): coarse or fine position embedding by segment (same shapes)."""
        v = self.config.vocab
        coarse = self.coarse_pos_emb(position.clamp(max=v.n_coarse + 2))
        return torch.where(segment[..., None] == 1, self.fine_pos_emb(position), coarse)

    def token_inputs(self, seq: DQSequence, cond: Tensor, start: int = 0) -> Tensor:
        """x_t for tokens start .. start+L-1 of `seq` (B, L): content (SOS -> class) +
        position + absolute position + segment."""
        v = self.config.vocab
        content = self.content_emb(seq.content)
        is_sos = (seq.content == v.content_sos)[..., None]
        content = torch.where(is_sos, self.cond_emb(cond)[:, None], content)
        L = seq.content.shape[1]
        return (
            content
            + self.position_embedding(seq.position, seq.segment)
            + self.abs_pos_emb[:, start : start + L]
            + self.seg_emb(seq.segment)
        )

    def position_logits(self, h: Tensor, next_segment: Tensor) -> Tensor:
        """Next-position logits in the vocabulary of the next token's granularity; coarse
        rows are padded with -inf to the fine vocabulary's size."""
        fine = self.fine_pos_head(h)
        coarse = self.coarse_pos_head(h)
        coarse = F.pad(coarse, (0, fine.shape[-1] - coarse.shape[-1]), value=float("-inf"))
        return torch.where(next_segment[..., None] == 1, fine, coarse)

    # ------------------------------------------------------------------ forward
    def forward(self, seq: Tensor | DQSequence, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits for a padded sequence (B, 3, L) (or a DQSequence) and class
        ids (B,): content (B, L-1, K+3) and position (B, L-1, 4·Nc+3), both predicting
        token t+1 from tokens ≤ t (coarse-position rows hold -inf beyond Nc+3)."""
        seq = as_sequence(seq)
        self.check_cond(cond)
        x = self.embed_drop(self.token_inputs(_head(seq), cond))
        h = self.position_transformer(x)
        nxt = _tail(seq)
        pos_logits = self.position_logits(h, nxt.segment)
        y = self.embed_drop(h + self.position_embedding(nxt.position, nxt.segment))
        content_logits = self.content_head(self.content_transformer(y))
        return content_logits, pos_logits

    def loss(self, seq: Tensor | DQSequence, cond: Tensor, soft_targets=None):
        return self.loss_from_logits(*self(seq, cond), seq, cond, soft_targets)

    def loss_from_logits(
        self,
        content_logits: Tensor,
        pos_logits: Tensor,
        seq: Tensor | DQSequence,
        cond: Tensor,
        soft_targets=None,
    ):
        """CE(content) + ½·[CE(coarse positions) + CE(fine positions)], pads ignored."""
        if soft_targets is not None:
            raise ConfigError("DQ-Transformer trains on hard codes: set train.soft_labels=false")
        nxt = _tail(as_sequence(seq))
        real = nxt.content != self.config.vocab.content_pad
        content = F.cross_entropy(content_logits[real].float(), nxt.content[real])
        parts = {"content_loss": content.detach()}
        loss = content
        for name, s in (("coarse_pos_loss", 0), ("fine_pos_loss", 1)):
            keep = real & (nxt.segment == s)
            if keep.any():
                ce = F.cross_entropy(pos_logits[keep].float(), nxt.position[keep])
                loss = loss + 0.5 * ce
                parts[name] = ce.detach()
        return loss, parts

    # ------------------------------------------------------------------ pairing
    def check_vae(self, vae) -> None:
        """One-line error when `vae` is not the DQ-VAE this transformer was trained with."""
        c, v = self.config, vae.config
        check_pairing(
            vae,
            "DQ-VAE",
            "K, coarse grid",
            c.vae_fingerprint,
            (c.codebook_size, c.coarse_size),
            (v.codebook_size, getattr(v, "coarse_size", None)),
        )

    @classmethod
    def for_vae(cls, vae, **overrides) -> DQTransformer:
        config = DQTransformerConfig(
            codebook_size=vae.config.codebook_size,
            coarse_size=vae.config.coarse_size,
            vae_fingerprint=codebook_fingerprint(vae.quantizer.codebook),
            **overrides,
        )
        return cls(config)


def as_sequence(seq: Tensor | DQSequence) -> DQSequence:
    """(B, 3, L) stacked streams -> DQSequence (the form datasets store)."""
    if isinstance(seq, DQSequence):
        return seq
    return DQSequence(seq[:, 0], seq[:, 1], seq[:, 2])


def stack_sequence(seq: DQSequence) -> Tensor:
    return torch.stack([seq.content, seq.position, seq.segment], 1)


def _head(seq: DQSequence) -> DQSequence:
    return DQSequence(seq.content[:, :-1], seq.position[:, :-1], seq.segment[:, :-1])


def _tail(seq: DQSequence) -> DQSequence:
    return DQSequence(seq.content[:, 1:], seq.position[:, 1:], seq.segment[:, 1:])
