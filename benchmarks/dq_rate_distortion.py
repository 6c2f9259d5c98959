"""DQ-VAE rate-distortion at EQUAL average tokens per image, on held-out bundled photos.

Every model is trained at equal K, steps and batch with the real CLI (`rqgen train-vae`) and
scored with `rqgen eval-vae` on crops of photos never seen in training. Token budgets on a
32 px image (coarse grid 4×4, fine grid 8×8):

    16  VQ 4×4 (the coarse grid alone)
    32  RQ 4×4×2  |  DQ r = 1/3 (16·(1 + 3r) = 32), entropy and learned router
    40  DQ r = 1/2 (the reference's default)
    48  RQ 4×4×3  |  DQ r = 2/3
    64  VQ 8×8 (the fine grid alone)

    python benchmarks/dq_rate_distortion.py --steps 300 --jobs 2

Reruns resume unfinished trainings from benchmarks/work/dq_rate_distortion.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import parse_args, train_all  # noqa: E402

COARSE = ["model.ch_mult=[1,2,4,4]"]  # tiny32 with one more level: f = 8, a 4×4 grid
VARIANTS = {  # name: (preset, overrides)
    "VQ 4x4 (coarse grid)": ("tiny32", [*COARSE, "model.code_depth=1"]),
    "RQ 4x4x2": ("tiny32", [*COARSE, "model.code_depth=2"]),
    "DQ r=1/3, entropy router": ("dq-tiny32", ["model.fine_fraction=0.3333"]),
    "DQ r=1/3, learned router": (
        "dq-tiny32",
        ["model.fine_fraction=0.3333", "model.router=learned"],
    ),
    "DQ r=1/2, entropy router": ("dq-tiny32", ["model.fine_fraction=0.5"]),
    "RQ 4x4x3": ("tiny32", [*COARSE, "model.code_depth=3"]),
    "DQ r=2/3, entropy router": ("dq-tiny32", ["model.fine_fraction=0.6667"]),
    "VQ 8x8 (fine grid)": ("tiny32", ["model.code_depth=1"]),
}


def main() -> None:
    args = parse_args(__doc__, 300, "benchmarks/work/dq_rate_distortion")
    results = train_all(VARIANTS, args)
    results.sort(key=lambda r: r["tokens_per_image"])

    rows = [
        "| variant | tokens/image | fine fraction | bits/image | PSNR (dB) | SSIM | "
        "codebook usage | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        frac = f"{r['fine_fraction']:.3f}" if "fine_fraction" in r else "–"
        rows.append(
            f"| {r['variant']} | {r['tokens_per_image']:.1f} | {frac} | {r['bits_per_image']:.0f} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {r['codebook_usage']:.0%} "
            f"| {r['perplexity']:.0f} |"
        )
    ref = results[0]
    body = (
        f"32 px crops, {args.steps} steps each (batch 64, Adam 4e-4, MSE + 0.25·commitment, no "
        f"LPIPS/GAN), K = 512, seed {args.seed}; scored on {ref['n_images']} fixed crops of the "
        "held-out photos (bundled:photos:val). Tokens per image are measured on those crops "
        "(the entropy threshold is fitted on training crops). Bits/image = tokens · log2 K; a DQ "
        "model also needs its granularity map (16 bits) to order its sequence.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    name = "dq_rate_distortion" + (f"_seed{args.seed}" if args.seed else "")
    print(write_results(name, body, {"steps": args.steps, "seed": args.seed, "results": results}))


if __name__ == "__main__":
    main()
