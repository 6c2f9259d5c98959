"""`eval-vae`, `reconstruct`, `eval-gen` and `fid-stats`: scoring both stages."""

from __future__ import annotations

import json
from pathlib import Path

from rqgen.cli.common import (
    POSITIVE_INT,
    add_compile,
    add_device,
    add_dtype,
    device_for,
    number,
    per_depth,
)


def add_eval_vae(sub) -> None:
    p = sub.add_parser("eval-vae", help="PSNR, SSIM, per-depth PSNR, codebook usage, rFID")
    p.add_argument("--vae", required=True, help="directory written by train-vae / save_pretrained")
    p.add_argument("--data", required=True, help="image folder or bundled:NAME[:val]")
    p.add_argument("--limit", type=POSITIVE_INT, help="score at most N images")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    add_device(p)
    p.add_argument("--no-rfid", action="store_true", help="skip rFID even if Inception is present")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=cmd_eval_vae)


def check_finite(result: dict, what: str) -> None:
    """A score that is NaN or infinite is an error, not a number printed with exit 0. A
    spread (`*_std`) undefined for too few samples becomes null instead."""
    import math

    from rqgen.errors import RqgenError

    for key, value in result.items():
        if key.endswith("_std") and isinstance(value, float) and not math.isfinite(value):
            result[key] = None
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise RqgenError(f"{what}: {key} is {value}, not a finite number: the model or the "
                             "data gives non-finite outputs")  # fmt: skip


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
        device_for(args.device),
        rfid=not args.no_rfid,
        progress=not args.json,
    )
    result = {"vae": str(args.vae), "data": args.data, **result}
    check_finite(result, f"eval-vae of {args.vae}")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="original/reconstruction pairs + coarse-to-fine strips")
    p.add_argument("--vae", required=True)
    p.add_argument("--input", required=True, help="an image file, a folder, or bundled:NAME[:val]")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--limit", type=POSITIVE_INT, default=16, help="at most N images from a folder/dataset"
    )
    add_device(p)
    p.set_defaults(func=cmd_reconstruct)


def load_inputs(src: str, resolution: int, limit: int):
    """An image file, a folder or a bundled set -> (images (N,3,R,R), names)."""
    import torch

    from rqgen.data import build_dataset, load_image
    from rqgen.data.folder import DECODE_ERRORS
    from rqgen.errors import DataError

    path = Path(src)
    if path.is_file():
        try:
            return load_image(path, resolution)[None], [path.stem]
        except DECODE_ERRORS as e:
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
    from rqgen.utils.files import check_writable_dir

    check_writable_dir(Path(args.out))
    vae = load_vae(args.vae)
    images, names = load_inputs(args.input, vae.config.resolution, args.limit)
    files = write_reconstructions(vae, images, names, args.out, device=device_for(args.device))
    print(f"rqgen: wrote {len(files)} images for {len(names)} input(s) to {args.out}")
    return 0


def add_eval_gen(sub) -> None:
    p = sub.add_parser("eval-gen", help="FID / KID / IS of samples against a reference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="folder of generated images")
    src.add_argument("--model", help="RQ-Transformer directory: sample, stream to --out, score")
    p.add_argument("--ref", required=True, help="data source (folder, bundled:...) or STATS.npz")
    p.add_argument("--n", type=POSITIVE_INT, help="samples to draw with --model (default: 1000)")
    p.add_argument(
        "--per-class", type=POSITIVE_INT, help="class-balanced: this many samples per class"
    )
    p.add_argument("--prompts", help="text models: a file of captions, one per line (cycled)")
    p.add_argument("--clip", help="local CLIP directory for the CLIP score of text models")
    p.add_argument("--out", help="where --model writes its PNGs (default: MODEL/samples_eval)")
    p.add_argument("--features", choices=["inception", "digits"], default="inception",
                   help="evaluator network (inception: local torch-fidelity weights)")  # fmt: skip
    p.add_argument(
        "--resolution", type=number(int, 8), help="image size for --ref/--samples folders"
    )
    p.add_argument("--top-k", type=per_depth(int))
    p.add_argument("--top-p", type=per_depth(float))
    p.add_argument("--temperature", type=number(float, 0, open_low=True), default=1.0)
    p.add_argument("--cfg", type=number(float, 0), default=1.0)
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    p.add_argument("--json", action="store_true")
    add_device(p)
    add_dtype(p)
    add_compile(p)
    p.set_defaults(func=cmd_eval_gen)


def add_fid_stats(sub) -> None:
    p = sub.add_parser("fid-stats", help="reference feature statistics for eval-gen (.npz)")
    p.add_argument("data", help="folder or bundled:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="STATS.npz")
    p.add_argument("--features", choices=["inception", "digits"], default="inception")
    p.add_argument("--resolution", type=number(int, 8), default=256)
    p.add_argument("--split", default="val", help="bundled split, or 'train' for random crops")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64)
    add_device(p)
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
    from rqgen.errors import ConfigError
    from rqgen.evaluate.generation import build_evaluator, check_digits_like, stats_of
    from rqgen.utils.files import check_output_file

    if Path(args.out).suffix != ".npz":  # eval-gen --ref tells statistics from data by it
        raise ConfigError(f"--out {args.out}: statistics files end in .npz (e.g. ref.npz)")
    check_output_file(Path(args.out))  # before the features are computed, not after
    device = device_for(args.device)
    evaluator = build_evaluator(args.features, device)
    data = build_dataset(args.data, args.resolution, split=args.split, labels=False)
    batches = _batches(data, args.batch_size)
    if args.features == "digits":
        batches = check_digits_like(batches, args.data)
    stats, _ = stats_of(batches, evaluator, source=args.data)
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
        check_digits_like,
        frechet_distance,
        inception_score,
        kernel_distance,
        stats_of,
    )

    device = device_for(args.device)
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
        if args.prompts and not model.config.text_vocab_size:
            raise ConfigError("--prompts is for text-conditional models; this one is not")
        if args.per_class is not None and args.n is not None:
            raise ConfigError("give --n or --per-class (N per class), not both")
        args.n = args.n or 1000
        if model.config.text_vocab_size:
            if not args.prompts:
                raise ConfigError("text-conditional model: pass --prompts FILE (one per line)")
            from rqgen.utils.files import read_text

            lines = [t.strip() for t in read_text(args.prompts, "--prompts").splitlines()
                     if t.strip()]  # fmt: skip
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
        from rqgen.utils.files import check_writable_dir

        check_writable_dir(out)  # before sampling, not after it
        cfg = SamplingConfig(args.temperature, args.top_k, args.top_p, args.cfg, args.compile)
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
        batches = _batches(data, args.batch_size)
        if args.features == "digits":
            batches = check_digits_like(batches, args.ref)
        ref, _ = stats_of(batches, evaluator, source=args.ref)
    kid, kid_std = kernel_distance(ref, fake)
    name = evaluator.score_names()
    result.update({
        "reference": ref.source or str(args.ref), "n_reference": ref.n, "n_samples": fake.n,
        name["fd"]: frechet_distance(ref, fake), name["kd"]: kid, name["kd"] + "_std": kid_std,
    })  # fmt: skip
    if logits is not None:
        result[name["is"]], result[name["is"] + "_std"] = inception_score(logits)
    if "clip_similarities" in result:
        sims = result.pop("clip_similarities")
        result["clip_score"] = float(torch.cat(sims).mean())  # mean cosine, as Table 3
    check_finite(result, "eval-gen")
    kid_std = result[name["kd"] + "_std"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        spread = f" ± {kid_std:.5f}" if kid_std is not None else ""
        kd = "KID" if name["kd"] == "kid" else f"KD({evaluator.short})"
        print(f"{name['label']} {result[name['fd']]:.3f}  {kd} {kid:.5f}{spread}  ({fake.n} "
              f"samples vs {ref.n} reference images of {result['reference']}; "
              f"{evaluator.name})")  # fmt: skip
    return 0
