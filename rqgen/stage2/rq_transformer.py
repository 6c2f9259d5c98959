"""RQ-Transformer (paper §3.2): a spatial transformer over T positions and a depth
transformer over the D codes of each position.

    p(S) = Π_t Π_d p(S_td | S_<t, S_t,<d)                                         (Eq. 9)
    u_t = PE_T(t) + Σ_d e(S_{t-1,d});  h_t = SpatialTransformer(u_1..u_t)         (Eq. 10-11)
    v_t1 = PE_D(1) + h_t;  v_td = PE_D(d) + Σ_{d'<d} e(S_td');  p_td = DepthT(v_t≤d) (Eq. 12-13)

Inputs are built from the frozen RQ-VAE codebook through learned projections, as in the
official model (`input_mlp`, `head_mlp`, `pos_emb_*`, `classifier`), so its weights import
key for key. The codebook is stored with the model (a buffer) so a checkpoint is complete
and can be checked against the VAE it is paired with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.checkpoint import Pretrained
from rqgen.errors import CheckpointError, ConfigError
from rqgen.quantize.dynamic import forced
from rqgen.stage2.block import RowLinear, Transformer, gpt_init


@dataclass
class RQTransformerConfig:
    codebook_size: int = 512  # K
    code_shape: list[int] = field(default_factory=lambda: [8, 8, 4])  # H, W, D
    embed_dim: int = 64  # dimension of the RQ-VAE code vectors
    shared_codebook: bool = True
    width: int = 256
    heads: int = 8  # spatial transformer
    depth_heads: int = 0  # depth transformer; 0: the same as `heads`
    spatial_layers: int = 8
    depth_layers: int = 4
    dropout: float = 0.1
    num_classes: int = 0  # 0: unconditional (one learned start token)
    text_vocab_size: int = 0  # > 0: text-conditional (BPE tokens as a causal prefix)
    text_length: int = 32
    text_loss_weight: float = 0.1  # official: 0.1 for text tokens, 0.9 for image codes
    text_pad_id: int = 0  # padding token: fills short captions; all-padding is CFG's null
    vae_fingerprint: str = ""  # hash of the codebook of the RQ-VAE the model was trained with
    # dynamic depth (quantize/dynamic.py): code K ends a position's stack (one more class of
    # the depth head, a zero code vector; every slot after it is K again)
    stop_code: bool = False

    @property
    def T(self) -> int:
        return self.code_shape[0] * self.code_shape[1]

    @property
    def D(self) -> int:
        return self.code_shape[2]

    @property
    def heads_depth(self) -> int:
        return self.depth_heads or self.heads

    @property
    def cond_length(self) -> int:
        return self.text_length if self.text_vocab_size else 1

    @property
    def classes(self) -> int:
        """Outcomes of one code: K, and the end of a stack with `stop_code`."""
        return self.codebook_size + self.stop_code


def check_class_ids(cond: Tensor, num_classes: int) -> None:
    """One-line error unless every id is a class 0..N-1 or the null class N."""
    bad = (cond < 0) | (cond > num_classes)
    if bad.any():
        k = int(cond[bad][0])
        if not num_classes:
            raise ConfigError(f"class id {k} given to an unconditional model: omit it")
        raise ConfigError(f"class id {k} is out of range: this model knows 0..{num_classes - 1}")


def check_pairing(vae, kind: str, what: str, fingerprint: str, expected, got) -> None:
    """One-line error when `vae` is not the one a transformer was trained with: its shape
    summary `got` differs from `expected`, or its codebook from the recorded fingerprint."""
    fp = codebook_fingerprint(vae.quantizer.codebook)
    if got != expected or fp != fingerprint:
        raise CheckpointError(
            f"this transformer was trained with another {kind} ({what} = {expected}, codebook "
            f"{fingerprint}); the given one has {got}, codebook {fp}: pass the VAE it was "
            "trained with"
        )


def codebook_fingerprint(codebook: Tensor) -> str:
    """Short hash of a codebook's values: pairs a transformer with its VAE."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class RQTransformer(nn.Module, Pretrained):
    model_type = "rq_transformer"
    # A trainer that has checked every label of its data sets this: the per-batch check
    # would read the ids back from the GPU (a host synchronisation, a graph break).
    conditions_checked = False
    config_class = RQTransformerConfig
    # the official code's module names, which rqgen's checkpoints used before: they load
    # (and official checkpoints convert) through this one mapping
    former_names = {
        "body_transformer": "spatial_transformer",
        "head_transformer": "depth_transformer",
    }

    def __init__(self, config: RQTransformerConfig, codebook: Tensor | None = None):
        super().__init__()
        self.config = c = config
        n_cb = 1 if c.shared_codebook else c.D
        if codebook is None:
            codebook = torch.zeros(n_cb, c.codebook_size, c.embed_dim)
        if codebook.shape != (n_cb, c.codebook_size, c.embed_dim):
            raise ConfigError(
                f"codebook of shape {tuple(codebook.shape)} does not fit the transformer config "
                f"({n_cb}, {c.codebook_size}, {c.embed_dim})"
            )
        self.register_buffer("codebook", codebook.detach().clone())

        C = c.width
        self.input_mlp = nn.Linear(c.embed_dim, C)  # e(code) -> spatial input
        self.head_mlp = RowLinear(c.embed_dim, C)  # partial sums Ẑ(d) -> depth input
        self.pos_emb_hw = nn.Parameter(torch.zeros(1, c.T, C))
        self.pos_emb_d = nn.Parameter(torch.zeros(1, c.D, C))
        self.pos_emb_cond = nn.Parameter(torch.zeros(1, c.cond_length, C))
        if c.text_vocab_size:
            self.cond_emb = nn.Embedding(c.text_vocab_size, C)
            self.cond_classifier = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, c.text_vocab_size))
        else:
            # classes 0..N-1 and, last, the null condition (unconditional start / CFG)
            self.cond_emb = nn.Embedding(c.num_classes + 1, C)
        self.embed_drop = nn.Dropout(c.dropout)
        self.spatial_transformer = Transformer(C, c.spatial_layers, c.heads, c.dropout)
        self.depth_transformer = Transformer(C, c.depth_layers, c.heads_depth, c.dropout)
        self.classifier = nn.Sequential(nn.LayerNorm(C), RowLinear(C, c.classes))
        if c.stop_code:  # input of an ended slot: the spatial transformer sees each depth
            self.stop_emb = nn.Parameter(torch.zeros(c.D, C))
        gpt_init(self, c.spatial_layers + c.depth_layers)
        for p in (self.pos_emb_hw, self.pos_emb_d, self.pos_emb_cond):
            nn.init.normal_(p, 0.0, 0.02)

    # --------------------------------------------------------------- embeddings
    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def table(self, depth: int) -> Tensor:
        """The code vectors of depth d (0-based), with a zero vector for the stop code."""
        t = self.codebook[0 if self.config.shared_codebook else depth]
        return F.pad(t, (0, 0, 0, 1)) if self.config.stop_code else t

    def code_vectors(self, codes: Tensor) -> Tensor:
        """e(S_td) for codes (..., D') -> (..., D', embed_dim), from the frozen codebook."""
        if self.config.shared_codebook:
            return F.embedding(codes, self.table(0))
        return torch.stack([self.code_vector(codes[..., d], d) for d in range(codes.shape[-1])], -2)

    def code_vector(self, codes: Tensor, depth: int) -> Tensor:
        """e(S_td) for the codes (...,) of one depth d -> (..., embed_dim): codebook d when
        every depth has its own (`shared_codebook=False`)."""
        return F.embedding(codes, self.table(depth))

    def check_cond(self, cond: Tensor) -> None:
        if not self.config.text_vocab_size and not self.conditions_checked:
            check_class_ids(cond, self.config.num_classes)

    def cond_tokens(self, cond: Tensor) -> Tensor:
        """Condition ids (B,) for classes / unconditional, (B, L) for text -> (B, L, C)."""
        c = self.config
        if not c.text_vocab_size:
            cond = cond.reshape(-1, 1)
            self.check_cond(cond)
        return self.cond_emb(cond) + self.pos_emb_cond[:, : cond.shape[1]]

    def code_inputs(self, codes: Tensor) -> Tensor:
        """Stacks (..., D) -> Σ_d input_mlp(e(S_td)) (..., C) (Eq. 10 without PE_T); ended
        slots add their stop embedding."""
        x = self.input_mlp(self.code_vectors(codes)).sum(-2)
        if self.config.stop_code:
            x = x + ((codes == self.config.codebook_size)[..., None] * self.stop_emb).sum(-2)
        return x

    def spatial_inputs(self, codes: Tensor) -> Tensor:
        """Codes (B, T', D) -> per-position inputs (B, T', C): Σ_d input_mlp(e(S_td)) + PE_T."""
        return self.code_inputs(codes) + self.pos_emb_hw[:, : codes.shape[1]]

    def depth_inputs(self, h: Tensor, codes: Tensor) -> Tensor:
        """h (N, C) and the first D' codes (N, D') of each position -> (N, D'+1, C):
        [h + PE_D(1), head_mlp(Ẑ(1)) + PE_D(2), ..., head_mlp(Ẑ(D')) + PE_D(D'+1)]."""
        x = h[:, None]
        if codes.shape[1] > 0:
            partial = self.code_vectors(codes).cumsum(-2)  # Ẑ(d): partial sums (Eq. 12)
            x = torch.cat([x, self.head_mlp(partial)], 1)
        return x + self.pos_emb_d[:, : x.shape[1]]

    # ------------------------------------------------------------------ forward
    def forward(self, codes: Tensor, cond: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced logits. codes (B, H, W, D) or (B, T, D); cond (B,) or (B, L) text.

        Returns image logits (B, T, D, K) and, for text models, text logits (B, L-1, V)
        predicting text token i+1 from tokens ≤ i.
        """
        c = self.config
        B = codes.shape[0]
        codes = codes.reshape(B, c.T, c.D)
        prefix = self.cond_tokens(cond)
        L = prefix.shape[1]
        # Eq. 10: the condition (or start) token, then the codes of positions 0..T-2
        x = torch.cat([prefix, self.spatial_inputs(codes[:, :-1])], 1)
        h = self.spatial_transformer(self.embed_drop(x))  # (B, L + T - 1, C)
        h_img = h[:, L - 1 :]  # the output at token L-1+t predicts position t
        v = self.depth_inputs(h_img.reshape(B * c.T, -1), codes.reshape(B * c.T, c.D)[:, :-1])
        out = self.depth_transformer(self.embed_drop(v))  # (B·T, D, C)
        logits = self.classifier(out).view(B, c.T, c.D, c.classes)
        if c.stop_code:  # no stack ends before its first code: p(stop at depth 1) = 0
            first = torch.zeros(c.D, c.classes, dtype=torch.bool, device=logits.device)
            first[0, c.codebook_size] = True
            logits = logits.masked_fill(first, torch.finfo(logits.dtype).min / 4)
        text_logits = self.cond_classifier(h[:, : L - 1]) if c.text_vocab_size else None
        return logits, text_logits

    def loss(
        self,
        codes: Tensor,
        cond: Tensor,
        soft_targets: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """NLL of Eq. 14 (with soft labels Q_τ when given: (B, T, D, K)); text models add
        the weighted text-token loss."""
        logits, text_logits = self(codes, cond)
        return self.loss_from_logits(logits, text_logits, codes, cond, soft_targets)

    def loss_from_logits(
        self,
        logits: Tensor,
        text_logits: Tensor | None,
        codes: Tensor,
        cond: Tensor,
        soft_targets: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        flat = logits.reshape(-1, c.classes).float()
        if c.stop_code:
            img = self.stop_code_loss(flat, codes, soft_targets)
        elif soft_targets is None:
            img = F.cross_entropy(flat, codes.reshape(-1))
        else:
            img = -(soft_targets.reshape(-1, c.classes) * F.log_softmax(flat, -1)).sum(-1).mean()
        parts = {"img_loss": img.detach()}
        if text_logits is None:
            return img, parts
        w = self.config.text_loss_weight
        txt = F.cross_entropy(
            text_logits.reshape(-1, text_logits.shape[-1]).float(), cond[:, 1:].reshape(-1)
        )
        parts["text_loss"] = txt.detach()
        return (1 - w) * img + w * txt, parts

    def stop_code_loss(self, flat: Tensor, codes: Tensor, soft: Tensor | None) -> Tensor:
        """NLL over the codes of each stack up to and including its stop code: the slots
        after it are forced (probability 1) and left out of the mean. Soft targets (..., K)
        hold for the codes; a stop slot's target is the stop code."""
        K, stop = self.config.codebook_size, codes == self.config.codebook_size
        keep = (~forced(codes, K)).reshape(-1).float()  # a weighted mean: no data-dependent shapes
        if soft is None:
            nll = F.cross_entropy(flat, codes.reshape(-1), reduction="none")
        else:
            target = F.pad(soft, (0, 1)).reshape(-1, K + 1)
            target = torch.where(stop.reshape(-1, 1), F.one_hot(codes.reshape(-1), K + 1), target)
            nll = -(target * F.log_softmax(flat, -1)).sum(-1)
        return (nll * keep).sum() / keep.sum()

    def constrain(self, logits: Tensor, depth: int, previous: Tensor | None) -> Tensor:
        """Logits (rows, classes) of depth d given the codes (rows,) of depth d-1: no stack
        ends before its first code, and an ended one stays ended. The excluded outcomes get
        a huge finite negative, not -inf, so that guidance (a difference of logits) keeps
        them excluded instead of turning them into NaN."""
        c = self.config
        if not c.stop_code:
            return logits
        low = torch.finfo(torch.float32).min / 4
        logits = logits.float().clone()
        if depth == 0:
            logits[:, c.codebook_size] = low
            return logits
        ended = (previous == c.codebook_size)[:, None]
        stop = torch.arange(c.classes, device=logits.device) == c.codebook_size
        return torch.where(ended, torch.where(stop, 0.0, low), logits)

    # ------------------------------------------------------------------- pairing
    def check_vae(self, vae) -> None:
        """One-line error when `vae` is not the RQ-VAE this transformer was trained with."""
        c, q = self.config, vae.quantizer
        shape = list(vae.config.code_shape)
        shape[2] = min(shape[2], c.D)  # the transformer may model a prefix of the stacks
        check_pairing(
            vae,
            "RQ-VAE",
            "K, code shape, dim",
            c.vae_fingerprint,
            (c.codebook_size, list(c.code_shape), c.embed_dim),
            (q.codebook_size, shape, q.dim),
        )

    @classmethod
    def for_vae(cls, vae, **overrides) -> RQTransformer:
        """A transformer sized for `vae`'s codes, holding a copy of its frozen codebook."""
        q = vae.quantizer
        config = RQTransformerConfig(
            codebook_size=q.codebook_size,
            code_shape=list(vae.config.code_shape),
            embed_dim=q.dim,
            shared_codebook=q.shared_table,
            vae_fingerprint=codebook_fingerprint(q.codebook),
            **overrides,
        )
        return cls(config, q.code_table())
