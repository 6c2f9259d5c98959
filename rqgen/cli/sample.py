"""`sample` and `demo`: drawing images from a trained pair, and the main job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rqgen.cli.common import (
    POSITIVE_INT,
    add_device,
    add_sampling,
    device_for,
    number,
    sampling_config,
)
from rqgen.demo import run_demo, run_photos_demo
from rqgen.errors import ConfigError
from rqgen.evaluate.clip import CLIPScorer
from rqgen.evaluate.digits import load_or_train
from rqgen.pipeline import RQPipeline
from rqgen.serve import serve
from rqgen.utils.files import atomic_write, check_output_file, check_writable_dir
from rqgen.utils.images import class_rows, save_grid, save_image
from rqgen.utils.paths import cache_dir


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample images from an RQ-Transformer")
    p.add_argument("--model", required=True, help="directory written by train-ar")
    p.add_argument("--vae", help="RQ-VAE directory (default: the one the model records)")
    p.add_argument("--n", type=POSITIVE_INT, default=16, help="number of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--class",
        dest="cls",
        help="class id or name (default: all classes in turn); 'none': unconditional samples "
        "of a class-conditional model",
    )
    g.add_argument(
        "--unconditional",
        dest="cls",
        action="store_const",
        const="none",
        help="unconditional samples of a class-conditional model (--class none)",
    )
    g.add_argument("--prompt", help="caption, for text-conditional models")
    p.add_argument(
        "--out", required=True, help="FILE.png (or .jpg, .webp): one grid; else a folder of PNGs"
    )
    p.add_argument("--save-codes", help="also write the sampled codes (.npy, (N, H, W, D))")
    p.add_argument(
        "--accept",
        type=number(float, 0, 1, open_low=True),
        help="rejection sampling: keep this fraction (0-1]",
    )
    p.add_argument(
        "--classifier",
        choices=["digits"],
        default="digits",
        help="classifier for --accept (digits: trained once on the bundled digits, cached)",
    )
    p.add_argument(
        "--clip-rerank",
        type=POSITIVE_INT,
        metavar="N",
        help="CLIP re-ranking: best of N candidates per image, scored against the prompt "
        "(or 'a photo of a CLASS'); needs local CLIP weights",
    )
    p.add_argument("--clip", help="local CLIP directory (default: $RQGEN_CLIP, then hub cache)")
    add_sampling(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:

    out = Path(args.out)  # checked before any sampling, not found unwritable after it
    grid = out.suffix.lower() in Image.registered_extensions()  # x.png, x.jpg, x.webp: a grid
    if grid:
        check_output_file(out)
    else:
        check_writable_dir(out)
    if args.save_codes:
        check_output_file(Path(args.save_codes))
    if args.accept is not None and args.clip_rerank is not None:
        raise ConfigError("choose one of --accept and --clip-rerank")
    device = device_for(args.device)
    pipe = RQPipeline.from_pretrained(args.model, args.vae, device, args.dtype)
    labels = None if args.cls is None else [args.cls]
    cond, names = pipe.conditions(labels, args.prompt, args.n)
    if args.accept is not None and "none" in names and pipe.conditioning == "class":
        raise ConfigError("--accept scores samples against their class: not with --class none")
    sampling, gen = sampling_config(args), torch.Generator(device).manual_seed(args.seed)
    if args.clip_rerank is not None:
        if pipe.conditioning == "none":
            raise ConfigError("--clip-rerank needs a text or class-conditional model")
        scorer = CLIPScorer.load(args.clip, device)  # before sampling: fail fast
        texts = [args.prompt or f"a photo of a {name}" for name in names]
        codes, images = pipe.clip_rerank(
            cond, texts, scorer, args.clip_rerank, sampling, gen, args.batch_size
        )
    elif args.accept is not None:
        classifier = load_or_train(cache_dir() / "classifiers", device)
        codes, images = pipe.rejection_sample(
            cond, classifier, args.accept, sampling, gen, args.batch_size
        )
    else:
        codes, images = pipe.sample(cond, sampling, gen, args.batch_size)
    images = images.cpu()
    upscale = max(1, 128 // pipe.vae.config.resolution)
    shown, nrow = images, 8
    if pipe.conditioning == "class":  # one row per class, as everywhere
        shown, nrow = class_rows(images, cond.tolist())
    if grid:
        save_grid(shown, out, nrow=nrow, upscale=upscale)
    else:
        for i, (img, name) in enumerate(zip(images, names)):
            save_image(img, out / f"{i:05d}_{name}.png", upscale=upscale)
        save_grid(shown, out / "grid.png", nrow=nrow, upscale=upscale)
    if args.save_codes:
        array = codes.cpu().numpy()

        def write(tmp):
            with open(tmp, "wb") as f:  # a handle: numpy would append .npy to a name
                np.save(f, array)

        atomic_write(args.save_codes, write, array.nbytes)
    print(f"rqgen: wrote {args.n} samples to {out}")
    return 0


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a browser demo of a trained transformer (Gradio)")
    p.add_argument("--model", required=True, help="directory written by train-ar")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 exposes it to the network)",
    )
    p.add_argument("--port", type=number(int, 1, 65535), default=7860)
    add_device(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:

    serve(args.model, args.host, args.port, args.device)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job on bundled data (what `make demo` runs)")
    p.add_argument("--out", default="demo_out")
    p.add_argument(
        "--steps", type=POSITIVE_INT, default=None, help="RQ-VAE steps (default: the demo's)"
    )
    p.add_argument(
        "--ar-steps", type=POSITIVE_INT, default=None, help="RQ-Transformer steps (digits)"
    )
    p.add_argument(
        "--task",
        choices=["digits", "photos"],
        default="digits",
        help="digits: RQ-VAE + RQ-Transformer on bundled digits; photos: the RQ-VAE on photos",
    )
    p.add_argument(
        "--dq", action="store_true", help="digits with DQ-VAE + DQ-Transformer (same budget)"
    )
    add_device(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:

    if args.task == "digits":
        run_demo(Path(args.out), args.steps, args.ar_steps, dq=args.dq, device=args.device)
    else:
        run_photos_demo(Path(args.out), steps=args.steps, device=args.device)
    return 0
