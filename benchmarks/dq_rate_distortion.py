"""DQ-VAE rate-distortion at EQUAL average tokens per image, on held-out bundled photos.

Every model is trained at equal K, steps and batch with the real CLI (`rqgen train-vae`) and
scored with `rqgen eval-vae` on crops of photos never seen in training. Token budgets on a
32 px image (coarse grid 4×4, fine grid 8×8):

    16  VQ 4×4 (the coarse grid alone)
    32  RQ 4×4×2  |  DQ r = 1/3 (16·(1 + 3r) = 32), entropy and learned router
    40  DQ r = 1/2 (the reference's default)
    48  RQ 4×4×3  |  DQ r = 2/3
    64  VQ 8×8 (the fine grid alone)

    python benchmarks/dq_rate_distortion.py --steps 150 --seeds 0 1 2 --jobs 2 --threads 1

Reruns resume unfinished trainings from benchmarks/work/dq_rate_distortion.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import cell, parse_args, results_name, train_all  # noqa: E402

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


# DQ against the fixed-length code of the nearest token budget, as paired differences
PAIRS = [
    ("DQ r=1/3, entropy router", "RQ 4x4x2"),
    ("DQ r=1/2, entropy router", "RQ 4x4x3"),
    ("DQ r=2/3, entropy router", "RQ 4x4x3"),
    ("DQ r=2/3, entropy router", "VQ 8x8 (fine grid)"),
]


FIXED = ["VQ 4x4 (coarse grid)", "RQ 4x4x2", "RQ 4x4x3"]  # the fixed-length curve: 16, 32, 48


def at_equal_tokens(by: dict, seeds: list[int]) -> list[str]:
    """Each DQ model against the RQ 4×4×D curve read at the tokens DQ spent on the held-out
    crops (its entropy threshold is fitted on training crops, so these are not its nominal
    budget): linear in tokens between D = 1, 2, 3 and held at D = 3 above 48 tokens."""
    rows = [
        "| DQ − RQ 4×4×D at DQ's tokens (dB, same seed) | tokens/image | mean ± 95% interval "
        "| per seed |",
        "|---|---|---|---|",
    ]
    if any((n, s) not in by for n in FIXED for s in seeds):
        return []
    for name in [k for k in VARIANTS if k.startswith("DQ") and (k, seeds[0]) in by]:
        d = []
        for s in seeds:
            curve = [(by[n, s]["tokens_per_image"], by[n, s]["psnr"]) for n in FIXED]
            rq = float(np.interp(by[name, s]["tokens_per_image"], *zip(*curve)))
            d.append(by[name, s]["psnr"] - rq)
        tokens = cell([by[name, s]["tokens_per_image"] for s in seeds], 1)
        rows.append(f"| {name} | {tokens} | {cell(d)} | {', '.join(f'{x:+.2f}' for x in d)} |")
    return rows


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/dq_rate_distortion")
    seeds = args.seeds or [args.seed]
    results = train_all(VARIANTS, args, seeds)
    by = {(r["variant"], r["seed"]): r for r in results}
    names = [k for k in VARIANTS if (k, seeds[0]) in by]
    names.sort(key=lambda k: by[k, seeds[0]]["tokens_per_image"])
    rows = [
        "| variant | tokens/image | fine fraction | bits/image | PSNR (dB) | SSIM | "
        "codebook usage | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [by[name, s] for s in seeds]
        frac = cell([r["fine_fraction"] for r in rs], 3) if "fine_fraction" in rs[0] else "–"
        rows.append(
            f"| {name} | {cell([r['tokens_per_image'] for r in rs], 1)} | {frac} "
            f"| {cell([r['bits_per_image'] for r in rs], 0)} | {cell([r['psnr'] for r in rs])} "
            f"| {cell([r['ssim'] for r in rs], 3)} "
            f"| {cell([100 * r['codebook_usage'] for r in rs], 0)}% "
            f"| {cell([r['perplexity'] for r in rs], 0)} |"
        )
    diffs = [
        "| difference (dB of PSNR, same seed) | tokens/image | mean ± 95% interval | per seed |",
        "|---|---|---|---|",
    ]
    for a, b in PAIRS:
        if (a, seeds[0]) in by and (b, seeds[0]) in by:
            d = [by[a, s]["psnr"] - by[b, s]["psnr"] for s in seeds]
            tokens = [by[n, seeds[0]]["tokens_per_image"] for n in (a, b)]
            diffs.append(
                f"| {a} − {b} | {tokens[0]:.1f} vs {tokens[1]:.0f} | {cell(d)} "
                f"| {', '.join(f'{x:+.2f}' for x in d)} |"
            )
    ref = results[0]
    body = (
        f"32 px crops, {args.steps} steps each at batch 64, K = 512, seeds "
        f"{', '.join(map(str, seeds))}, every model on tiny32's recipe (Adam (0.9, 0.99), lr "
        "1e-3 cosine, zero-initialised residual branches, MSE + 0.25·commitment, no LPIPS/GAN) "
        "with the linear patch shortcut: DQ's on its fine grid (f = 4, starting as the identity), "
        "the 4×4 fixed-length codes' on f = 8 patches, starting as the codec of the mean of "
        "each patch's four 4×4 sub-patches, as DQ's coarse regions do. Scored on "
        f"{ref['n_images']} fixed crops of the held-out "
        f"{args.data} ({args.val_data}); means ± half-width of the 95% Student-t interval over "
        "seeds. Tokens per image are measured on those crops (the entropy threshold is fitted "
        "on training crops). Bits/image = tokens · log2 K; a DQ model also needs its "
        "granularity map (16 bits) to order its sequence.\n\n"
        + "\n".join(rows)
        + "\n\nDQ against fixed-length codes of the nearest budget:\n\n"
        + "\n".join(diffs)
        + "\n"
    )
    if curve := at_equal_tokens(by, seeds):
        body += (
            "\nAt the tokens each DQ model spent (the fixed-length curve read there; held at "
            "RQ 4×4×3's PSNR above 48 tokens, which favours DQ):\n\n" + "\n".join(curve) + "\n"
        )
    name = results_name("dq_rate_distortion", args)
    data = {"steps": args.steps, "seeds": seeds, "results": results}
    print(write_results(name, body, data))


if __name__ == "__main__":
    main()
