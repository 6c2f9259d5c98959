"""The `rqgen` command (also `python -m rqgen`). Each subcommand is a thin shell over a
library function, so everything here can also be done from Python."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rqgen.errors import RqgenError


def _add_train_vae(sub) -> None:
    p = sub.add_parser("train-vae", help="train (or resume) an RQ-VAE or a DQ-VAE")
    _training_args(p, "tiny32", "tiny32, imagenet256, ffhq256, dq-tiny32, dq-imagenet256",
                   "model.code_depth=8 train.lr=1e-4")  # fmt: skip
    p.add_argument("--val-data", help="held-out images scored during training")
    p.set_defaults(func=cmd_train_vae)


def _training_args(p, default: str, presets: str, example: str) -> None:
    """Arguments every trainer takes (the same under torchrun)."""
    p.add_argument("--data", required=True, help="image folder, bundled:photos or bundled:digits")
    p.add_argument("--out", required=True, help="output directory; rerun to resume")
    p.add_argument("--config", default=default, help=f"preset ({presets}) or a JSON/YAML file")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides train.steps)")
    _add_device(p)
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")


def _run_training(args, load_experiment, train):
    """Config from preset/file + overrides, then train(exp); the process group is always
    torn down so torchrun workers exit cleanly on errors too."""
    from rqgen.train.common import shutdown_runtime

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps else [])
    exp = load_experiment(args.config, overrides)
    try:
        return train(exp)
    finally:
        shutdown_runtime()


def cmd_train_vae(args) -> int:
    from rqgen.configs import DQVAEExperiment, load_vae_experiment
    from rqgen.train.vae import train_vae

    kind = []

    def train(exp):
        kind.append("DQVAE" if isinstance(exp, DQVAEExperiment) else "RQVAE")
        return train_vae(exp, args.data, args.out, args.val_data, args.device)

    out = _run_training(args, load_vae_experiment, train)
    name = kind[0]
    print(f"rqgen: {name[:2]}-VAE saved to {out} (load with {name}.from_pretrained('{out}'))")
    return 0


def _add_eval_vae(sub) -> None:
    p = sub.add_parser("eval-vae", help="PSNR, SSIM, per-depth PSNR, codebook usage, rFID")
    p.add_argument("--vae", required=True, help="directory written by train-vae / save_pretrained")
    p.add_argument("--data", required=True, help="image folder or bundled:NAME[:val]")
    p.add_argument("--limit", type=int, help="score at most N images")
    p.add_argument("--batch-size", type=int, default=64)
    _add_device(p)
    p.add_argument("--no-rfid", action="store_true", help="skip rFID even if Inception is present")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=cmd_eval_vae)


def _add_device(p) -> None:
    p.add_argument(
        "--device", default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process "
        "takes cuda:LOCAL_RANK (default: auto)",
    )  # fmt: skip


def _add_dtype(p) -> None:
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="the transformer's precision while sampling; auto: bf16 on CUDA, fp32 on CPU "
        "(whose bf16 is emulated and slower) (default: auto)",
    )  # fmt: skip


def _device(name: str | None):
    from rqgen.utils.device import resolve_device

    return resolve_device(name)


def cmd_eval_vae(args) -> int:
    from rqgen.data import build_dataset
    from rqgen.evaluate.vae import evaluate_vae
    from rqgen.stage1 import load_vae

    vae = load_vae(args.vae)
    data = build_dataset(args.data, vae.config.resolution, split="val")
    result = evaluate_vae(
        vae,
        data,
        args.limit,
        args.batch_size,
        _device(args.device),
        rfid=not args.no_rfid,
        progress=not args.json,
    )
    result = {"vae": str(args.vae), "data": args.data, **result}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="original/reconstruction pairs + coarse-to-fine strips")
    p.add_argument("--vae", required=True)
    p.add_argument("--input", required=True, help="an image file, a folder, or bundled:NAME[:val]")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=16, help="at most N images from a folder/dataset")
    _add_device(p)
    p.set_defaults(func=cmd_reconstruct)


def load_inputs(src: str, resolution: int, limit: int):
    """An image file, a folder or a bundled set -> (images (N,3,R,R), names)."""
    import torch

    from rqgen.data import build_dataset, load_image
    from rqgen.errors import DataError

    path = Path(src)
    if path.is_file():
        try:
            return load_image(path, resolution)[None], [path.stem]
        except OSError as e:
            raise DataError(f"cannot read image '{src}': {e}") from e
    data = build_dataset(src, resolution, split="val")
    n = min(limit, len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    paths = getattr(data, "paths", None)
    names = [Path(paths[i]).stem if paths else f"{i:04d}" for i in range(n)]
    return images, names


def cmd_reconstruct(args) -> int:
    from rqgen.evaluate.vae import write_reconstructions
    from rqgen.stage1 import load_vae

    vae = load_vae(args.vae)
    images, names = load_inputs(args.input, vae.config.resolution, args.limit)
    files = write_reconstructions(vae, images, names, args.out, device=_device(args.device))
    print(f"rqgen: wrote {len(files)} images for {len(names)} input(s) to {args.out}")
    return 0


def _add_train_ar(sub) -> None:
    p = sub.add_parser("train-ar", help="train (or resume) an RQ-Transformer on a VAE's codes")
    p.add_argument("--vae", required=True, help="the RQ-VAE directory (frozen)")
    _training_args(p, "ar-tiny", "ar-tiny, ar-flat-tiny, ...", "model.width=512 train.tau=1.0")
    p.add_argument("--captions", help="JSONL/CSV manifest of captions (text conditioning)")
    p.set_defaults(func=cmd_train_ar)


def cmd_train_ar(args) -> int:
    from rqgen.configs import load_ar_experiment
    from rqgen.train.ar import train_ar

    out = _run_training(
        args,
        load_ar_experiment,
        lambda exp: train_ar(exp, args.vae, args.data, args.out, args.captions, args.device),
    )
    print(f"rqgen: transformer saved to {out} (sample with: rqgen sample --model {out})")
    return 0


def _per_depth(kind):
    """'16' -> 16; '16,8,4,4' -> [16, 8, 4, 4] (one value per depth)."""

    def parse(text: str):
        values = [kind(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values

    return parse


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from an RQ-Transformer")
    p.add_argument("--model", required=True, help="directory written by train-ar")
    p.add_argument("--vae", help="RQ-VAE directory (default: the one the model records)")
    p.add_argument("--n", type=int, default=16, help="number of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--class", dest="cls", help="class id or name (default: all classes in turn)")
    g.add_argument("--prompt", help="caption, for text-conditional models")
    p.add_argument("--top-k", type=_per_depth(int), help="K, or one per depth: 64,32,16,16")
    p.add_argument("--top-p", type=_per_depth(float), help="P, or one per depth")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="FILE.png: a grid; otherwise a directory")
    p.add_argument("--save-codes", help="also write the sampled codes (.npy, (N, H, W, D))")
    p.add_argument("--accept", type=float, help="rejection sampling: keep this fraction (0-1]")
    p.add_argument(
        "--classifier",
        choices=["digits"],
        default="digits",
        help="classifier for --accept (digits: trained once on the bundled digits, cached)",
    )
    p.add_argument(
        "--clip-rerank", type=int, metavar="N",
        help="CLIP re-ranking: best of N candidates per image, scored against the prompt "
        "(or 'a photo of a CLASS'); needs local CLIP weights",
    )  # fmt: skip
    p.add_argument("--clip", help="local CLIP directory (default: $RQGEN_CLIP, then hub cache)")
    _add_device(p)
    _add_dtype(p)
    p.set_defaults(func=cmd_sample)


def sample_conditions(model, meta, tokenizer, n: int, cls: str | None, prompt: str | None):
    """Condition tensor for n samples, and a name per sample for file names."""
    import torch

    from rqgen.errors import ConfigError

    classes = meta.get("classes") or []
    if getattr(model.config, "text_vocab_size", 0):
        if prompt is None:
            raise ConfigError("this model is text-conditional: pass --prompt TEXT")
        return tokenizer.encode([prompt] * n), ["prompt"] * n
    if prompt is not None:
        raise ConfigError("this model is not text-conditional: drop --prompt")
    if model.config.num_classes == 0:
        if cls is not None:
            raise ConfigError("this model is unconditional: drop --class")
        return torch.full((n,), model.null_class, dtype=torch.long), ["sample"] * n
    if cls is None:  # every class in turn: a balanced grid
        ids = [i % model.config.num_classes for i in range(n)]
    else:
        if cls in classes:
            ids = [classes.index(cls)] * n
        elif cls.lstrip("-").isdigit():
            ids = [int(cls)] * n
        else:
            raise ConfigError(f"unknown class {cls!r}: use an id 0..{model.config.num_classes - 1}")
    cond = torch.tensor(ids, dtype=torch.long)
    model.check_cond(cond)  # one-line error when an id is out of range
    names = [classes[i] if i < len(classes) else str(i) for i in ids]
    return cond, names


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from rqgen.errors import ConfigError
    from rqgen.stage2.sampling import SamplingConfig, generate, load_for_sampling, rejection_sample
    from rqgen.utils.images import save_grid, save_image

    device = _device(args.device)
    model, vae, meta, tokenizer = load_for_sampling(args.model, args.vae, device, args.dtype)
    cond, names = sample_conditions(model, meta, tokenizer, args.n, args.cls, args.prompt)
    cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.cfg)
    gen = torch.Generator(device).manual_seed(args.seed)
    cond = cond.to(device)
    if args.accept is not None and args.clip_rerank is not None:
        raise ConfigError("choose one of --accept and --clip-rerank")
    if args.clip_rerank is not None:
        from rqgen.evaluate.clip import CLIPScorer
        from rqgen.stage2.sampling import clip_rerank

        if model.config.num_classes == 0 and not getattr(model.config, "text_vocab_size", 0):
            raise ConfigError("--clip-rerank needs a text or class-conditional model")
        scorer = CLIPScorer.load(args.clip, device)  # before sampling: fail fast
        texts = [args.prompt or f"a photo of a {name}" for name in names]
        codes, images = clip_rerank(
            vae, model, cond, texts, scorer, args.clip_rerank, cfg, gen, args.batch_size
        )
    elif args.accept is not None:
        from rqgen.evaluate.digits import load_or_train
        from rqgen.utils.paths import cache_dir

        classifier = load_or_train(cache_dir() / "classifiers", device)
        codes, images = rejection_sample(
            vae, model, cond, classifier, args.accept, cfg, gen, args.batch_size
        )
    else:
        codes, images = generate(vae, model, cond, cfg, gen, args.batch_size)
    images = images.cpu()
    out = Path(args.out)
    upscale = max(1, 128 // vae.config.resolution)
    nrow = min(args.n, model.config.num_classes or 8) if args.cls is None else 8
    if out.suffix.lower() == ".png":
        save_grid(images, out, nrow=nrow, upscale=upscale)
    else:
        for i, (img, name) in enumerate(zip(images, names)):
            save_image(img, out / f"{i:05d}_{name}.png", upscale=upscale)
        save_grid(images, out / "grid.png", nrow=nrow, upscale=upscale)
    if args.save_codes:
        np.save(args.save_codes, codes.cpu().numpy())
    print(f"rqgen: wrote {args.n} samples to {out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on bundled data (what `make demo` runs)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=None, help="RQ-VAE steps (default: the demo's)")
    p.add_argument("--ar-steps", type=int, default=None, help="RQ-Transformer steps (digits)")
    p.add_argument(
        "--task", choices=["digits", "photos"], default="digits",
        help="digits: RQ-VAE + RQ-Transformer on bundled digits; photos: the RQ-VAE on photos",
    )  # fmt: skip
    p.add_argument(
        "--dq", action="store_true", help="digits with DQ-VAE + DQ-Transformer (same budget)"
    )
    _add_device(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from rqgen.demo import run_demo, run_photos_demo

    if args.task == "digits":
        run_demo(Path(args.out), args.steps, args.ar_steps, dq=args.dq, device=args.device)
    else:
        run_photos_demo(Path(args.out), steps=args.steps, device=args.device)
    return 0


def _add_convert_official(sub) -> None:
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
    import os

    from rqgen.convert.official import convert_stage1, convert_stage2, load_official_config
    from rqgen.errors import ConfigError

    out = Path(args.out)
    vae = convert_stage1(args.stage1, args.ema)  # everything is checked before writing
    tokenizer = None
    if args.bpe_vocab or args.bpe_merges:
        from rqgen.stage2.text import TextTokenizer

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
        model.save_pretrained(out / "ar", vae=vae_rel, conditioning=conditioning, classes=[],
                              source=str(args.stage2), converted_from="official",
                              official_sampling=sampling)  # fmt: skip
        if model.config.text_vocab_size:
            tokenizer.length = model.config.text_length
            tokenizer.save(out / "ar")
        print(f"rqgen: wrote {out / 'ar'} (RQ-Transformer, {conditioning}-conditional)")
    return 0


def _add_eval_gen(sub) -> None:
    p = sub.add_parser("eval-gen", help="FID / KID / IS of samples against a reference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="folder of generated images")
    src.add_argument("--model", help="RQ-Transformer directory: sample, stream to --out, score")
    p.add_argument("--ref", required=True, help="data source (folder, bundled:...) or STATS.npz")
    p.add_argument("--n", type=int, default=1000, help="samples to draw with --model")
    p.add_argument("--per-class", type=int, help="class-balanced: this many samples per class")
    p.add_argument("--prompts", help="text models: a file of captions, one per line (cycled)")
    p.add_argument("--clip", help="local CLIP directory for the CLIP score of text models")
    p.add_argument("--out", help="where --model writes its PNGs (default: MODEL/samples_eval)")
    p.add_argument("--features", choices=["inception", "digits"], default="inception",
                   help="evaluator network (inception: local torch-fidelity weights)")  # fmt: skip
    p.add_argument("--resolution", type=int, help="image size for --ref/--samples folders")
    p.add_argument("--top-k", type=_per_depth(int))
    p.add_argument("--top-p", type=_per_depth(float))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    _add_device(p)
    _add_dtype(p)
    p.set_defaults(func=cmd_eval_gen)


def _add_fid_stats(sub) -> None:
    p = sub.add_parser("fid-stats", help="reference feature statistics for eval-gen (.npz)")
    p.add_argument("data", help="folder or bundled:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="STATS.npz")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--split", default="val", help="bundled split, or 'train' for random crops")
    p.add_argument("--batch-size", type=int, default=64)
    _add_device(p)
    p.set_defaults(func=cmd_fid_stats)


def _batches(dataset, batch_size: int):
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, _ in tqdm(loader, desc="features", leave=False):
        yield x


def _with_clip_score(images, texts: list[str], clip: str | None, device, result: dict):
    """Pass image batches through, collecting CLIP similarity to their captions in `result`;
    without local CLIP weights, `clip_score` is null with the reason."""
    from rqgen.errors import CheckpointError
    from rqgen.evaluate.clip import CLIPScorer

    try:
        scorer = CLIPScorer.load(clip, device)
        result["clip_evaluator"] = f"CLIP {clip or 'default'} (mean cosine, not x100)"
        result["clip_similarities"] = []
    except CheckpointError as e:
        scorer, result["clip_score"], result["clip_score_note"] = None, None, str(e)
    start = 0
    for batch in images:
        if scorer is not None:
            sims = scorer.similarity(batch, texts[start : start + len(batch)])
            result["clip_similarities"].append(sims.cpu())
        start += len(batch)
        yield batch


def cmd_fid_stats(args) -> int:
    from rqgen.data import build_dataset
    from rqgen.evaluate.generation import build_evaluator, stats_of

    device = _device(args.device)
    evaluator = build_evaluator(args.features, device)
    data = build_dataset(args.data, args.resolution, split=args.split, labels=False)
    stats, _ = stats_of(_batches(data, args.batch_size), evaluator, source=args.data)
    stats.save(args.out)
    print(f"rqgen: wrote {args.out} ({stats.n} images of {args.data}, {evaluator.name})")
    return 0


def cmd_eval_gen(args) -> int:
    import torch

    from rqgen.data import build_dataset
    from rqgen.errors import ConfigError, DataError
    from rqgen.evaluate.generation import (
        FeatureStats,
        build_evaluator,
        frechet_distance,
        inception_score,
        kernel_distance,
        stats_of,
    )

    device = _device(args.device)
    evaluator = build_evaluator(args.features, device)
    result: dict = {"evaluator": evaluator.name}
    ref = None
    if str(args.ref).endswith(".npz"):  # checked before any sampling: fail fast
        ref = FeatureStats.load(args.ref)
        if ref.evaluator != evaluator.name:
            raise DataError(
                f"'{args.ref}' was computed with {ref.evaluator!r}, not {evaluator.name!r}: "
                "recompute it with rqgen fid-stats --features " + args.features
            )
    if args.model:
        from rqgen.stage2.sampling import SamplingConfig, load_for_sampling, stream_samples

        model, vae, meta, tokenizer = load_for_sampling(args.model, None, device, args.dtype)
        k = model.config.num_classes
        if model.config.text_vocab_size:
            if not args.prompts:
                raise ConfigError("text-conditional model: pass --prompts FILE (one per line)")
            lines = [t.strip() for t in Path(args.prompts).read_text().splitlines() if t.strip()]
            if not lines:
                raise DataError(f"no captions in '{args.prompts}'")
            texts = [lines[i % len(lines)] for i in range(args.n)]
            cond = tokenizer.encode(texts)
        elif args.per_class is not None:
            if not k:
                raise ConfigError("--per-class needs a class-conditional model")
            cond = torch.arange(k).repeat_interleave(args.per_class)
        elif k:
            cond = torch.arange(args.n) % k  # every class in turn: balanced up to one
        else:
            cond = torch.full((args.n,), model.null_class)
        out = Path(args.out) if args.out else Path(args.model) / "samples_eval"
        cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.cfg)
        gen = torch.Generator(device).manual_seed(args.seed)
        classes = meta.get("classes") or []
        images = stream_samples(vae, model, cond.to(device), cfg, gen, args.batch_size, out,
                                classes)  # fmt: skip
        if model.config.text_vocab_size:
            images = _with_clip_score(images, texts, args.clip, device, result)
        resolution = vae.config.resolution
        result.update(samples=str(out), sampling=dict(vars(cfg)), model=str(args.model))
        if cond.dim() == 1:
            result["per_class"] = {str(c): int((cond == c).sum()) for c in cond.unique().tolist()}
    else:
        resolution = args.resolution or 256
        data = build_dataset(args.samples, resolution, split="val", labels=False)
        images = _batches(data, args.batch_size)
        result["samples"] = str(args.samples)
    fake, logits = stats_of(images, evaluator, source="samples", with_logits=True)
    if ref is None:
        data = build_dataset(args.ref, args.resolution or resolution, split="val", labels=False)
        ref, _ = stats_of(_batches(data, args.batch_size), evaluator, source=args.ref)
    kid, kid_std = kernel_distance(ref, fake)
    result.update(
        reference=ref.source or str(args.ref), n_reference=ref.n, n_samples=fake.n,
        fid=frechet_distance(ref, fake), kid=kid, kid_std=kid_std,
    )  # fmt: skip
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits)
    if "clip_similarities" in result:
        sims = result.pop("clip_similarities")
        result["clip_score"] = float(torch.cat(sims).mean())  # mean cosine, as Table 3
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"FID {result['fid']:.3f}  KID {kid:.5f} ± {kid_std:.5f}  ({fake.n} samples vs "
              f"{ref.n} reference images of {result['reference']}; {evaluator.name})")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rqgen", description="Residual-quantized autoregressive image generation."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train_vae,
        _add_eval_vae,
        _add_reconstruct,
        _add_train_ar,
        _add_sample,
        _add_demo,
        _add_convert_official,
        _add_eval_gen,
        _add_fid_stats,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        return args.func(args)
    except RqgenError as e:
        print(f"rqgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rqgen: interrupted after {time.time() - start:.0f}s", file=sys.stderr)
        return 130
