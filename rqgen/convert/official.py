"""Import the official RQ-VAE / RQ-Transformer checkpoints (kakaobrain/rq-vae-transformer).

Each official stage is a directory with `model.pt` (a torch pickle holding `state_dict` and
optionally `state_dict_ema`) and `config.yaml`. The pickle is read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers: a file that
would run code when unpickled is refused. Every tensor is mapped onto our modules and the
result is written as `save_pretrained` directories:

- stage 1: encoder/decoder keys are identical; of each codebook `quantizer.codebooks.i.*` the
  padding row is dropped (weight has K+1 rows) and a shared codebook (the same tensor under
  every depth) is stored once; `cluster_size_ema` / `embed_ema` become our EMA buffers.
- stage 2: `classifier.{layer_norm,linear}` and `cond_classifier.{layer_norm,linear}` become
  `Sequential` indices; class models get one extra, untrained row in `cond_emb` for our null
  class (classifier-free guidance needs a model trained with condition dropout, which the
  official ones were not: sample imported models with --cfg 1); unconditional models' single
  start token is our null token. The frozen codebook comes from the converted RQ-VAE.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from rqgen.checkpoint import current_names
from rqgen.errors import CheckpointError
from rqgen.stage1.rqvae import RQVAE, RQVAEConfig
from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig, codebook_fingerprint
from rqgen.utils.files import read_yaml

# the only stage-2 architecture the official configs publish (every released model)
OFFICIAL_STAGE2_FLAGS = {
    "input_emb_vqvae": True,
    "head_emb_vqvae": True,
    "cumsum_depth_ctx": True,
    "shared_tok_emb": True,
    "shared_cls_emb": True,
}


# ---------------------------------------------------------------------------- reading


def load_official_state(path: str | Path, ema: bool = False) -> dict[str, Tensor]:
    """The `state_dict` (or `state_dict_ema`) of an official `model.pt`, without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no official checkpoint at '{path}' (expected model.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing '{path}': it is not a plain tensor pickle and loading it could run code "
            f"({first[:160]})"
        ) from e
    except Exception as e:  # truncated or not a torch file at all
        raise CheckpointError(f"cannot read '{path}' as a torch checkpoint: {e}") from e
    key = "state_dict_ema" if ema else "state_dict"
    if isinstance(ckpt, dict) and key in ckpt:
        state = ckpt[key]
    elif isinstance(ckpt, dict) and not ema and all(isinstance(v, Tensor) for v in ckpt.values()):
        state = ckpt  # a bare state dict
    else:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"'{path}' has no '{key}' (found {found})")
    # EMA wrappers and DDP prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_official_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"no config.yaml in '{directory}' (official checkpoints ship one)")
    return read_yaml(path, "official config")


def _check_keys(mapped: dict[str, Tensor], model: torch.nn.Module, source: str) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:4])})")
        raise CheckpointError(f"{source} does not match the official layout: " + "; ".join(parts))
    for k, v in model.state_dict().items():
        if mapped[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: '{k}' has shape {tuple(mapped[k].shape)}, the config implies "
                f"{tuple(v.shape)}"
            )


# ---------------------------------------------------------------------------- stage 1


def stage1_config(arch: dict) -> RQVAEConfig:
    hp, dd = arch.get("hparams", {}), arch.get("ddconfig", {})
    if hp.get("bottleneck_type", "rq") != "rq":
        raise CheckpointError(f"bottleneck_type {hp['bottleneck_type']!r}: only 'rq' is supported")
    if dd.get("double_z", False):
        raise CheckpointError("ddconfig.double_z=true is not an RQ-VAE layout")
    try:
        h, w, d = hp["code_shape"]
        cfg = RQVAEConfig(
            resolution=dd["resolution"],
            in_channels=dd.get("in_channels", 3),
            ch=dd["ch"],
            ch_mult=list(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=list(dd["attn_resolutions"]),
            dropout=dd.get("dropout", 0.0),
            z_channels=dd["z_channels"],
            embed_dim=hp["embed_dim"],
            codebook_size=hp["n_embed"],
            code_depth=d,
            shared_codebook=hp.get("shared_codebook", True),
            decay=hp.get("decay", 0.99),
            commitment_weight=hp.get("latent_loss_weight", 0.25),
            restart_unused_codes=hp.get("restart_unused_codes", True),
            norm_groups=32,
        )
    except KeyError as e:
        raise CheckpointError(f"official stage-1 config lacks arch.{e.args[0]}") from e
    if (h, w) != (cfg.latent_size, cfg.latent_size):
        raise CheckpointError(f"code_shape {hp['code_shape']} does not match the encoder's grid")
    return cfg


def convert_stage1_state(state: dict[str, Tensor], cfg: RQVAEConfig) -> dict[str, Tensor]:
    out = {k: v for k, v in state.items() if not k.startswith("quantizer.")}
    K, D = cfg.codebook_size, cfg.code_depth
    depths = [0] if cfg.shared_codebook else list(range(D))
    try:
        weights = [state[f"quantizer.codebooks.{i}.weight"] for i in range(D)]
        sizes = [state[f"quantizer.codebooks.{i}.cluster_size_ema"] for i in depths]
        sums = [state[f"quantizer.codebooks.{i}.embed_ema"] for i in depths]
    except KeyError as e:
        raise CheckpointError(f"official stage-1 weights lack '{e.args[0]}'") from e
    if any(w.shape[0] != K + 1 for w in weights):
        raise CheckpointError(
            f"codebook weight has {weights[0].shape[0]} rows; n_embed={K} implies {K + 1} "
            "(the last row is padding)"
        )
    if cfg.shared_codebook and any(not torch.equal(w, weights[0]) for w in weights):
        raise CheckpointError("config says shared_codebook but the depths' codebooks differ")
    out["quantizer.codebook"] = torch.stack([weights[i][:K] for i in depths]).float()
    out["quantizer.cluster_size"] = torch.stack(sizes).float()
    out["quantizer.embed_sum"] = torch.stack(sums).float()
    out["quantizer.initialized"] = torch.tensor(True)
    return out


def convert_stage1(directory: str | Path, ema: bool = False) -> RQVAE:
    """An official stage-1 directory -> our RQVAE (loaded, in eval mode)."""
    conf = load_official_config(directory)
    cfg = stage1_config(conf.get("arch", {}))
    model = RQVAE(cfg)
    state = convert_stage1_state(load_official_state(Path(directory) / "model.pt", ema), cfg)
    _check_keys(state, model, f"stage-1 checkpoint '{directory}'")
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------- stage 2


def stage2_config(arch: dict, vae: RQVAE) -> RQTransformerConfig:
    bad = {k: arch.get(k) for k, v in OFFICIAL_STAGE2_FLAGS.items() if bool(arch.get(k)) != v}
    if bad:
        raise CheckpointError(
            f"unsupported official stage-2 variant {bad}: only the published layout "
            f"{OFFICIAL_STAGE2_FLAGS} is implemented"
        )
    try:
        h, w, d = arch["block_size"]
        vocab = arch["vocab_size"]
        vocab = vocab if isinstance(vocab, int) else vocab[0]
        n_cond, len_cond = (
            max(arch.get("vocab_size_cond", 0), 1),
            max(arch.get("block_size_cond", 0), 1),
        )
        heads_body, heads_head = arch["body"]["block"]["n_head"], arch["head"]["block"]["n_head"]
        cfg = RQTransformerConfig(
            codebook_size=vocab,
            code_shape=[h, w, d],
            embed_dim=arch.get("input_embed_dim") or vae.config.embed_dim,
            shared_codebook=vae.config.shared_codebook,
            width=arch["embed_dim"],
            heads=heads_body,
            depth_heads=heads_head if heads_head != heads_body else 0,
            spatial_layers=arch["body"]["n_layer"],
            depth_layers=arch["head"]["n_layer"],
            dropout=0.0,
            num_classes=n_cond if (len_cond == 1 and n_cond > 1) else 0,
            text_vocab_size=n_cond if len_cond > 1 else 0,
            text_length=len_cond if len_cond > 1 else 32,
            text_loss_weight=0.1,  # official: 0.9·image + 0.1·text, as ours
            vae_fingerprint=codebook_fingerprint(vae.quantizer.codebook),
        )
    except KeyError as e:
        raise CheckpointError(f"official stage-2 config lacks arch.{e.args[0]}") from e
    if vocab != vae.config.codebook_size or list(cfg.code_shape) != list(vae.config.code_shape):
        raise CheckpointError(
            f"stage-2 config (K={vocab}, code shape {cfg.code_shape}) does not match the stage-1 "
            f"model (K={vae.config.codebook_size}, code shape {list(vae.config.code_shape)})"
        )
    return cfg


def convert_stage2_state(state: dict[str, Tensor], cfg: RQTransformerConfig, vae: RQVAE) -> dict:
    rename = {
        "classifier.layer_norm.": "classifier.0.",
        "classifier.linear.": "classifier.1.",
        "cond_classifier.layer_norm.": "cond_classifier.0.",
        "cond_classifier.linear.": "cond_classifier.1.",
    }
    out = {}
    for k, v in state.items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    out = current_names(out, RQTransformer.former_names)
    if cfg.num_classes and "cond_emb.weight" in out:
        emb = out["cond_emb.weight"]
        # our null class: untrained in official models; the mean keeps it in distribution
        out["cond_emb.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])
    out["codebook"] = vae.quantizer.codebook.detach().clone()
    return out


def convert_stage2(
    directory: str | Path, vae: RQVAE, ema: bool = False, tokenizer=None
) -> RQTransformer:
    """An official stage-2 directory -> our RQTransformer; text models need the official BPE
    as a `TextTokenizer` (`TextTokenizer.from_official`)."""
    conf = load_official_config(directory)
    cfg = stage2_config(conf.get("arch", {}), vae)
    if cfg.text_vocab_size:
        if tokenizer is None:
            raise CheckpointError(
                "this is a text-conditional model: pass the official BPE files "
                "(--bpe-vocab bpe-16k-vocab.json --bpe-merges bpe-16k-merges.txt)"
            )
        if tokenizer.vocab_size > cfg.text_vocab_size:
            raise CheckpointError(
                f"the BPE vocabulary has {tokenizer.vocab_size} tokens but the model embeds "
                f"{cfg.text_vocab_size}: wrong vocabulary files"
            )
        cfg.text_pad_id = tokenizer.pad_id
    model = RQTransformer(cfg, vae.quantizer.codebook)
    state = convert_stage2_state(load_official_state(Path(directory) / "model.pt", ema), cfg, vae)
    _check_keys(state, model, f"stage-2 checkpoint '{directory}'")
    model.load_state_dict(state)
    return model.eval()
