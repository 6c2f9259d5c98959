"""`convert-official`: the official RQ-VAE / RQ-Transformer checkpoints as rqgen models."""

from __future__ import annotations

import os
from pathlib import Path

from rqgen.convert.official import convert_stage1, convert_stage2, load_official_config
from rqgen.errors import ConfigError
from rqgen.stage2.text import TextTokenizer


def add_convert_official(sub) -> None:
    p = sub.add_parser(
        "convert-official",
        help="import official RQ-VAE / RQ-Transformer checkpoints (model.pt + config.yaml)",
    )
    p.add_argument("--stage1", required=True, help="official stage-1 directory")
    p.add_argument("--stage2", help="official stage-2 directory (paired with --stage1)")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema instead of state_dict")
    p.add_argument("--bpe-vocab", help="text models: the official bpe-16k-vocab.json")
    p.add_argument("--bpe-merges", help="text models: the official bpe-16k-merges.txt")
    p.add_argument("--out", required=True, help="writes OUT/vae and, with --stage2, OUT/ar")
    p.set_defaults(func=cmd_convert_official)


def cmd_convert_official(args) -> int:

    out = Path(args.out)
    vae = convert_stage1(args.stage1, args.ema)  # everything is checked before writing
    tokenizer = None
    if args.bpe_vocab or args.bpe_merges:
        if not (args.bpe_vocab and args.bpe_merges):
            raise ConfigError("pass both --bpe-vocab and --bpe-merges")
        tokenizer = TextTokenizer.from_official(args.bpe_vocab, args.bpe_merges)
    model = convert_stage2(args.stage2, vae, args.ema, tokenizer) if args.stage2 else None
    vae.save_pretrained(out / "vae", source=str(args.stage1), converted_from="official")
    print(f"rqgen: wrote {out / 'vae'} (RQ-VAE, code shape {list(vae.config.code_shape)})")
    if model is not None:
        vae_rel = os.path.relpath((out / "vae").resolve(), (out / "ar").resolve())
        conditioning = (
            "text"
            if model.config.text_vocab_size
            else "class"
            if model.config.num_classes
            else "none"
        )
        conf = load_official_config(args.stage2)
        # the top-k / top-p / temperature the official scripts sample this model with
        sampling = conf.get("sampling") or conf.get("experiment", {}).get("sample") or {}
        model.save_pretrained(
            out / "ar",
            vae=vae_rel,
            conditioning=conditioning,
            classes=[],
            source=str(args.stage2),
            converted_from="official",
            official_sampling=sampling,
        )
        if model.config.text_vocab_size:
            tokenizer.length = model.config.text_length
            tokenizer.save(out / "ar")
        print(f"rqgen: wrote {out / 'ar'} (RQ-Transformer, {conditioning}-conditional)")
    return 0
