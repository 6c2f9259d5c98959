"""`train-vae`, `train-ar`, `refit-codebook` and `plan`: training both stages, a new codebook
for a trained RQ-VAE, and sizing training for GPUs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rqgen.checkpoint import read_config
from rqgen.cli.common import POSITIVE_INT, add_device, device_for, number
from rqgen.configs import (
    PAPER_MODELS,
    ar_transformer_config,
    load_ar_experiment,
    load_vae_experiment,
)
from rqgen.distributed import shutdown_runtime
from rqgen.errors import ConfigError
from rqgen.family import family_of
from rqgen.stage1 import load_vae
from rqgen.train.ar import train_ar
from rqgen.train.plan import GiB, plan, recommend
from rqgen.train.refit import refit_codebook
from rqgen.train.vae import train_vae


def add_train_vae(sub) -> None:
    p = sub.add_parser("train-vae", help="train (or resume) an RQ-VAE or a DQ-VAE")
    _training_args(
        p,
        "tiny32",
        "tiny32, imagenet256, ffhq256, dq-tiny32, dq-imagenet256",
        "model.code_depth=8 train.lr=1e-4",
    )
    p.add_argument("--val-data", help="held-out images scored during training")
    p.set_defaults(func=cmd_train_vae)


def _training_args(p, default: str, presets: str, example: str) -> None:
    """Arguments every trainer takes (the same under torchrun)."""
    p.add_argument("--data", required=True, help="image folder, bundled:photos or bundled:digits")
    p.add_argument("--out", required=True, help="output directory; rerun to resume")
    p.add_argument("--config", default=default, help=f"preset ({presets}) or a JSON/YAML file")
    p.add_argument(
        "--steps", type=POSITIVE_INT, help="total optimizer steps (overrides train.steps)"
    )
    add_device(p)
    p.add_argument("overrides", nargs="*", help=f"key=value, e.g. {example}")


def _is_rank0() -> bool:

    return os.environ.get("RANK", "0") == "0"


def _run_training(args, load_experiment, train):
    """Config from preset/file + overrides, then train(exp); the process group is always
    torn down so torchrun workers exit cleanly on errors too."""

    overrides = list(args.overrides) + (
        [f"train.steps={args.steps}"] if args.steps is not None else []
    )
    exp = load_experiment(args.config, overrides)
    finished = False
    try:
        out = train(exp)
        finished = True
        return out
    finally:
        shutdown_runtime(finished)


def cmd_train_vae(args) -> int:

    kind = []

    def train(exp):
        kind.append(family_of(exp).vae.__name__)
        return train_vae(exp, args.data, args.out, args.val_data, args.device)

    out = _run_training(args, load_vae_experiment, train)
    name = kind[0]
    if _is_rank0():
        print(f"rqgen: {name[:2]}-VAE saved to {out} (load with {name}.from_pretrained('{out}'))")
    return 0


def add_train_ar(sub) -> None:
    p = sub.add_parser("train-ar", help="train (or resume) an RQ-Transformer on a VAE's codes")
    p.add_argument("--vae", required=True, help="the RQ-VAE directory (frozen)")
    _training_args(p, "ar-tiny", "ar-tiny, ar-flat-tiny, ...", "model.width=512 train.tau=1.0")
    p.add_argument("--captions", help="JSONL/CSV manifest of captions (text conditioning)")
    p.set_defaults(func=cmd_train_ar)


def cmd_train_ar(args) -> int:

    out = _run_training(
        args,
        load_ar_experiment,
        lambda exp: train_ar(exp, args.vae, args.data, args.out, args.captions, args.device),
    )
    if _is_rank0():
        print(f"rqgen: transformer saved to {out} (sample with: rqgen sample --model {out})")
    return 0


def add_refit_codebook(sub) -> None:
    p = sub.add_parser(
        "refit-codebook",
        help="a new codebook for a trained RQ-VAE (e.g. one shared, scaled codebook for its "
        "separate ones), fit to its latents with encoder and decoder frozen",
    )
    p.add_argument("--vae", required=True, help="the trained RQ-VAE (directory or hub repository)")
    p.add_argument("--data", required=True, help="training images: its latents fit the codebook")
    p.add_argument("--out", required=True, help="where the new RQ-VAE is written")
    p.add_argument("--steps", type=POSITIVE_INT, default=1000, help="EMA updates (default: 1000)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per update")
    p.add_argument(
        "--refine",
        type=number(int, 0),
        default=10,
        help="least-squares iterations on the final error after the EMA (0: none; only "
        "where codebooks × K ≤ 4096)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    p.add_argument(
        "overrides",
        nargs="*",
        help="quantizer settings, e.g. model.shared_codebook=true model.depth_scale=true",
    )
    p.set_defaults(func=cmd_refit_codebook)


def cmd_refit_codebook(args) -> int:

    bad = [o for o in args.overrides if "=" not in o or not o.startswith("model.")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not model.key=value (model.depth_scale=true)")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(args.overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from e
    changes = given.get("model", {})
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty: give a new directory")
    vae = load_vae(args.vae)
    model = refit_codebook(
        vae, args.data, changes, args.steps, args.batch_size, args.seed,
        device_for(args.device), refine=args.refine,
    )  # fmt: skip
    model.save_pretrained(
        args.out, refit_from=str(args.vae), data=args.data, steps=args.steps, refine=args.refine
    )
    c = model.config
    kind = "shared" if c.shared_codebook else "separate"
    scaled = ", scaled per depth" if c.depth_scale else ""
    if args.refine and not model.quantizer.refinable:
        q = model.quantizer
        print(f"rqgen: no least-squares refinement: {q.num_codebooks * q.codebook_size} code "
              f"vectors, more than its limit of {q.MAX_REFINE_CODES}")  # fmt: skip
    print(
        f"rqgen: RQ-VAE with a new {kind} codebook (K={c.codebook_size}, D={c.code_depth}"
        f"{scaled}) saved to {args.out}; score it with rqgen eval-vae --vae {args.out} --data ..."
    )
    return 0


def add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="how many GPUs a stage-2 model needs: memory per GPU, DDP or FSDP, batch"
    )
    p.add_argument("--config", required=True, help="stage-2 preset (e.g. ar-imagenet-1.4b) or file")
    p.add_argument("--gpus", type=POSITIVE_INT, required=True, help="number of GPUs (all nodes)")
    p.add_argument(
        "--gpu-mem",
        type=number(float, 0, open_low=True),
        required=True,
        help="memory per GPU, GiB (e.g. 80)",
    )
    p.add_argument(
        "--batch", type=POSITIVE_INT, help="global batch (default: the config's train.batch_size)"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="bf16",
        help="training precision (default: bf16, as on GPUs)",
    )
    p.add_argument(
        "--vae",
        help="size the model for this RQ-VAE's codes (default: the paper's "
        "RQ-VAE for a paper preset, else 8x8x4 codes, K 16384, 256 dims)",
    )
    p.add_argument(
        "--classes",
        type=POSITIVE_INT,
        default=1000,
        help="classes of a class-conditional model without a paper preset",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model.spatial_layers=30")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:

    if args.gpus < 1 or args.gpu_mem <= 0:
        raise ConfigError(f"--gpus must be ≥ 1 and --gpu-mem > 0 (got {args.gpus}, {args.gpu_mem})")
    exp = load_ar_experiment(args.config, list(args.overrides))
    paper = PAPER_MODELS.get(args.config)
    if args.vae:
        v = read_config(args.vae)
        K, shape, dim = v["codebook_size"], v["code_shape"], v["embed_dim"]
        source = f"the RQ-VAE in {args.vae}"
    else:
        K = paper.codebook_size if paper else 16384
        shape, dim = [8, 8, 4], 256
        source = "the paper's RQ-VAE" if paper else "an assumed 8x8x4 RQ-VAE"
    classes = paper.num_classes if paper else args.classes
    cfg = ar_transformer_config(exp.model, K, shape, dim, classes, exp.model.text_vocab_size)
    batch = args.batch or exp.train.batch_size
    result = plan(cfg, args.gpus, args.gpu_mem, args.precision, exp.train.soft_labels)
    result["recommendation"] = recommend(result, args.gpus, batch)
    if args.json:
        head = {
            "config": args.config,
            "gpus": args.gpus,
            "gpu_mem_gib": args.gpu_mem,
            "global_batch": batch,
            "precision": args.precision,
        }
        print(json.dumps({**head, **result}, indent=2))
        return 0
    m = exp.model
    print(
        f"{args.config}: {result['params'] / 1e6:,.0f}M parameters ({m.spatial_layers}+"
        f"{m.depth_layers} layers, width {m.width}), codes {tuple(shape)}, K {K} ({source}); "
        f"{args.precision}, global batch {batch} on {args.gpus} × {args.gpu_mem:g} GiB"
    )
    gb = lambda b: f"{b / GiB:,.1f} GiB"  # noqa: E731
    print(
        f"  fp32 weights {gb(result['weights_bytes'])}, gradients {gb(result['grads_bytes'])}, "
        f"AdamW state {gb(result['optimizer_bytes'])}"
    )
    print(f"  {'strategy':<22}{'states/GPU':>14}{'act./sample':>14}{'max batch/GPU':>15}")
    for s in result["strategies"]:
        print(
            f"  {s['name']:<22}{gb(s['state_bytes_per_gpu']):>14}"
            f"{gb(s['activation_bytes_per_sample']):>14}{s['max_micro_batch']:>15}"
        )
    print(f"  use: {result['recommendation']}")
    return 0
