"""Dynamic depth at equal bits: one D = 8 RQ-VAE decoded with the same number of codes at
every position (the prefix Ẑ(d)) against the same total spent where the residual is largest
(`RQVAE.encode_to_stacks`, rqgen/quantize/dynamic.py).

A dynamic map also tells each position's depth, 3 bits for 1..8 against the 9 bits of a code
(K = 512), so at equal bits per image it holds d − 1/3 codes per position on average where
the fixed map holds d. Both are scored on the held-out images (PSNR as eval-vae); the
models are the D = 8 tokenizers of benchmarks/prefix_depth.py (every one of both
architectures: plain, with quantizer dropout, with a codebook per depth; --only picks some),
the same runs in the same folders: those missing (its records keep scores, not models) are
trained first.

    python benchmarks/dynamic_depth.py --seeds 0 1 2
    python benchmarks/dynamic_depth.py --steps 1000 --seeds 0 1 2
    python benchmarks/dynamic_depth.py --data fashion-mnist --seeds 0 1 2

Results: benchmarks/results/dynamic_depth[_fashion_mnist][_1000steps].md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from prefix_depth import ARCHS, variants  # noqa: E402
from prefix_depth import MODELS as D8  # noqa: E402
from rate_distortion import cell, parse_args, results_name, run_dir, train_all  # noqa: E402

from rqgen.data import build_dataset  # noqa: E402
from rqgen.evaluate import psnr  # noqa: E402
from rqgen.quantize.dynamic import stack_depths  # noqa: E402
from rqgen.stage1.rqvae import RQVAE  # noqa: E402

MODELS = [f"{arch}, {m}" for arch in ARCHS for m in D8]  # every D = 8 tokenizer
DEPTHS = (2, 3, 4, 6)


def scores(model_dir: Path, images: torch.Tensor) -> dict:
    """PSNR of the fixed prefixes and of dynamic maps at equal bits and at equal codes."""
    vae = RQVAE.from_pretrained(model_dir).eval()
    D, K = vae.config.code_depth, vae.config.codebook_size
    side = math.log2(D) / math.log2(K)  # a position's depth, in codes
    out = {"fixed": {}, "equal_bits": {}, "equal_codes": {}, "depth_entropy": {}}
    with torch.no_grad():
        codes = vae.encode_to_codes(images)
        for d in DEPTHS:
            fixed = vae.decode_codes(codes, d).clamp(-1, 1)
            out["fixed"][d] = float(psnr(fixed, images).mean())
            for key, m in (("equal_bits", d - side), ("equal_codes", d)):
                stacks = vae.encode_to_stacks(images, m)
                out[key][d] = float(psnr(vae.decode_stacks(stacks).clamp(-1, 1), images).mean())
            p = torch.bincount(stack_depths(stacks, K).flatten(), minlength=D + 1).float()
            p = p[p > 0] / p.sum()
            out["depth_entropy"][d] = float(-(p * p.log2()).sum())  # bits per position
    return out


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/prefix_depth")  # the prefix study's runs
    seeds = args.seeds = args.seeds or [args.seed]
    torch.set_grad_enabled(False)
    val = build_dataset(args.val_data, 32, "val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    wanted = [m for m in MODELS if not args.only or m in args.only]
    every = variants()
    train_all({m: every[m] for m in wanted}, args, seeds, keep_models=wanted)
    runs = {}
    for model in wanted:
        for s in seeds:
            runs[model, s] = scores(run_dir(args, model, s), images)
            print(model, s, runs[model, s], flush=True)
    rows = [
        "| tokenizer | d | fixed Ẑ(d) | dynamic, equal bits (d − 1/3 codes) | dynamic − fixed "
        "| dynamic, equal codes (d) | dynamic − fixed | depth map entropy (bits/position) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in wanted:
        for d in DEPTHS:
            fixed = [runs[model, s]["fixed"][d] for s in seeds]
            bits = [runs[model, s]["equal_bits"][d] for s in seeds]
            same = [runs[model, s]["equal_codes"][d] for s in seeds]
            entropy = [runs[model, s]["depth_entropy"][d] for s in seeds]
            rows.append(
                f"| {model} | {d} | {cell(fixed)} | {cell(bits)} "
                f"| {cell([a - b for a, b in zip(bits, fixed)])} | {cell(same)} "
                f"| {cell([a - b for a, b in zip(same, fixed)])} | {cell(entropy)} |"
            )
    body = (
        f"PSNR (dB) on the {len(images)} held-out images ({args.val_data}) of the prefix "
        f"study's D = 8 tokenizers ({args.steps} steps), seeds "
        f"{', '.join(map(str, args.seeds))} (means ± half-width of the 95% Student-t "
        "interval over seeds; differences paired by seed). The dynamic maps spend a per-image "
        "budget of codes on the largest residual energies in the latent space (greedy on the "
        "marginal gains), every position keeping at least one code. The last column is the "
        "empirical entropy of the equal-codes depth maps: what a depth map costs when "
        "entropy-coded, against the 3 bits the equal-bits column charges.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    data = {"seeds": args.seeds, "runs": {f"{m} | {s}": v for (m, s), v in runs.items()}}
    print(write_results(results_name("dynamic_depth", args), body, data))


if __name__ == "__main__":
    main()
