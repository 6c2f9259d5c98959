"""`convert-official`: the official RQ-VAE / RQ-Transformer checkpoints as rqgen models;
`push`: a model directory to the Hugging Face hub."""

from __future__ import annotations

import os
from pathlib import Path

from rqgen.convert.official import convert_stage1, convert_stage2, load_official_config
from rqgen.errors import ConfigError
from rqgen.hub import push
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


def add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a model directory to the Hugging Face hub")
    p.add_argument("--model", required=True, help="a directory written by train-vae / train-ar")
    p.add_argument("--repo", required=True, help="org/name on the hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    """The token comes from `hf auth login` or $HF_TOKEN, as for every hub tool."""
    url = push(args.model, args.repo, private=args.private, message=args.message)
    print(f"rqgen: pushed {args.model} to {args.repo} ({url})")
    return 0
