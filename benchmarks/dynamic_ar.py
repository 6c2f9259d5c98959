"""Dynamic depth through stage 2: rate as the transformer's own code length.

A dynamic code map also says where each stack ends, so comparing it at "equal codes" flatters
it and charging a fixed 2-3 bits per position for the depth map is arbitrary. The honest rate
is what a model of the codes needs to describe an image: the held-out negative log-likelihood
of an RQ-Transformer trained on them (an arithmetic coder driven by it gets within bits of
that). So, per seed: one tiny32 8×8×4 tokenizer (`rqgen train-vae`), then RQ-Transformers
(`rqgen train-ar --config ar-tiny`, unconditional) on its fixed prefixes d = 1..4
(`model.code_depth=d`) and on dynamic stacks of mean depth m (`model.mean_depth=m`, a stop
code ending each stack). Each is scored on the held-out photo crops: bits per image (NLL of
the argmin codes, stop codes included) and the PSNR of what those codes decode to.

    python benchmarks/dynamic_ar.py --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/dynamic_ar.py --data fashion-mnist --seeds 0 1 2

Fashion-MNIST: 10000 of its training images, scored on 1000 test images (Debian's
dataset-fashion-mnist, installed when missing).

Reruns resume from benchmarks/work/dynamic_ar. Results: benchmarks/results/dynamic_ar.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import cell, choose_data, one, run, slug  # noqa: E402

from rqgen.data import build_dataset  # noqa: E402
from rqgen.evaluate import psnr  # noqa: E402
from rqgen.quantize.dynamic import forced  # noqa: E402
from rqgen.stage1.rqvae import RQVAE  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer  # noqa: E402

FIXED = (1, 2, 3, 4)
DYNAMIC = (1.5, 2.0, 2.5, 3.0)
VARIANTS = {f"fixed d={d}": f"model.code_depth={d}" for d in FIXED} | {
    f"dynamic m={m:g}": f"model.mean_depth={m:g}" for m in DYNAMIC
}


def train_ar(name: str, override: str, vae: Path, args, seed: int) -> Path:
    out = Path(args.workdir) / f"seed{seed}" / slug(name)
    if not (out / "done").is_file():  # else: trained (a rerun of train-ar resumes)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rqgen", "train-ar", "--vae", str(vae), "--data",
               args.train_data, "--out", str(out), "--steps", str(args.ar_steps), "--device",
               "cpu", "--config", "ar-tiny", "model.conditioning=none", f"train.seed={seed}",
               f"train.sample_every={args.ar_steps}", override]  # fmt: skip
        run(cmd, args.threads, out / "bench.log")
        (out / "done").write_text("")
    print(f"seed {seed}, {name}: trained", flush=True)
    return out


@torch.no_grad()
def score(vae_dir: Path, ar_dir: Path, images: torch.Tensor, mean_depth: float | None) -> dict:
    """Bits per image (held-out NLL) and PSNR of the codes the transformer models."""
    vae = RQVAE.from_pretrained(vae_dir).eval()
    model = RQTransformer.from_pretrained(ar_dir).eval()
    c = model.config
    bits, quality, codes_per_image = [], [], []
    for s in range(0, len(images), 64):
        x = images[s : s + 64]
        if mean_depth:
            codes = vae.encode_to_stacks(x, mean_depth)
        else:
            codes = vae.encode_to_codes(x)[..., : c.D]
        cond = torch.full((len(x),), model.null_class)
        logits, _ = model(codes, cond)
        flat = codes.reshape(len(x), c.T, c.D)
        lp = logits.float().log_softmax(-1).gather(-1, flat[..., None])[..., 0]
        stop = flat == c.codebook_size
        drawn = ~forced(flat, c.codebook_size)
        bits.append(-(lp * drawn).sum((1, 2)) / math.log(2))
        quality.append(psnr(vae.decode_codes(codes).clamp(-1, 1), x))
        codes_per_image.append((~stop).sum((1, 2)).float())
    return {
        "bits": float(torch.cat(bits).mean()),
        "psnr": float(torch.cat(quality).mean()),
        "codes": float(torch.cat(codes_per_image).mean()),
        "plain_bits": float(torch.cat(codes_per_image).mean()) * math.log2(c.codebook_size),
    }


def fixed_at(bits: float, curve: list[tuple[float, float]]) -> float:
    """PSNR of the fixed-depth curve [(bits, psnr)] at `bits`, piecewise linear."""
    xs, ys = zip(*sorted(curve))
    return float(np.interp(bits, xs, ys, left=math.nan, right=math.nan))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=150, help="stage-1 steps")
    p.add_argument("--ar-steps", type=int, default=1500, help="stage-2 steps (ar-tiny's)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="benchmarks/work/dynamic_ar")
    p.add_argument("--only", nargs="*", help="subset of variant names (fixed d=1..4 always)")
    p.add_argument("--data", choices=["photos", "fashion-mnist"], default="photos")
    args = p.parse_args()
    global VARIANTS
    if args.only:
        VARIANTS = {k: v for k, v in VARIANTS.items() if k.startswith("fixed") or k in args.only}
    args.seed = -1
    choose_data(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(
            lambda s: one("tiny32 8x8x4", ["model.code_depth=4"], args, "tiny32", s),
            args.seeds))  # fmt: skip
        jobs = [(name, o, s) for s in args.seeds for name, o in VARIANTS.items()]
        vae_dir = lambda s: Path(args.workdir) / f"seed{s}" / slug("tiny32 8x8x4")  # noqa: E731
        dirs = list(pool.map(lambda j: train_ar(j[0], j[1], vae_dir(j[2]), args, j[2]), jobs))
    val = build_dataset(args.val_data, 32, "val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    torch.set_num_threads(args.threads * args.jobs)
    runs = {}
    for (name, _, s), d in zip(jobs, dirs):
        mean = float(name.split("=")[1]) if name.startswith("dynamic") else None
        runs[name, s] = score(vae_dir(s), d, images, mean)
        print(name, s, runs[name, s], flush=True)
    rows = ["| variant | codes/image | PSNR (dB) | held-out NLL (bits/image) | bits at log2 K "
            "per code | PSNR of the fixed-depth curve at the same NLL | difference |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in VARIANTS:
        rs = [runs[name, s] for s in args.seeds]
        curve = [[(runs[f"fixed d={d}", s]["bits"], runs[f"fixed d={d}", s]["psnr"])
                  for d in FIXED] for s in args.seeds]  # fmt: skip
        at = [fixed_at(r["bits"], cv) for r, cv in zip(rs, curve)]
        diff = [r["psnr"] - a for r, a in zip(rs, at)]
        shown = ("–", "–") if name.startswith("fixed") else (cell(at), cell(diff))
        rows.append(
            f"| {name} | {cell([r['codes'] for r in rs], 0)} | {cell([r['psnr'] for r in rs])} "
            f"| {cell([r['bits'] for r in rs], 0)} | {cell([r['plain_bits'] for r in rs], 0)} "
            f"| {shown[0]} | {shown[1]} |"
        )
    pairs = ["| dynamic m − fixed d = m (same seed) | Δ PSNR (dB) | Δ NLL (bits/image) |",
             "|---|---|---|"]  # fmt: skip
    for m in [m for m in (2, 3) if f"dynamic m={m}" in VARIANTS]:
        dp = [
            runs[f"dynamic m={m}", s]["psnr"] - runs[f"fixed d={m}", s]["psnr"] for s in args.seeds
        ]
        db = [
            runs[f"dynamic m={m}", s]["bits"] - runs[f"fixed d={m}", s]["bits"] for s in args.seeds
        ]
        pairs.append(f"| m = d = {m} | {cell(dp)} | {cell(db, 0)} |")
    held_out = "bundled:photos:val" if args.data == "photos" else "Fashion-MNIST test images"
    body = (
        f"Per seed ({', '.join(map(str, args.seeds))}): one tiny32 8×8×4 tokenizer (K = 512, "
        f"{args.steps} steps at batch 64 on {args.data}), and one unconditional ar-tiny "
        f"RQ-Transformer per row ({args.ar_steps} steps, soft labels and stochastic codes as "
        "the preset has them, its best checkpoint on the validation split). Scored on the "
        f"{len(images)} held-out images ({held_out}): the transformer's NLL of their "
        "argmin codes (dynamic: of the stacks cut at that mean depth, each stop code counted) "
        "and the PSNR they decode to. Means ± half-width of the 95% Student-t interval over "
        "seeds; the curve column interpolates each seed's fixed-depth (NLL, PSNR) points "
        "linearly (– outside their range).\n\n" + "\n".join(rows) + "\n\n" + "\n".join(pairs) + "\n"
    )
    data = {"seeds": args.seeds, "runs": {f"{n} | {s}": v for (n, s), v in runs.items()}}
    name = "dynamic_ar" + ("" if args.data == "photos" else "_" + slug(args.data))
    print(write_results(name, body, data))


if __name__ == "__main__":
    main()
