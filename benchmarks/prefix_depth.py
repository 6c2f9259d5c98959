"""One tokenizer at every rate: the prefixes Ẑ(1), Ẑ(2), Ẑ(4) of one D = 8 RQ-VAE, with and
without quantizer dropout (model.quantize_dropout; drawing every depth 1..8, or only the
rates compared, model.quantize_dropout_depths, where a depth listed n times is drawn n times
as often; with one shared codebook or a codebook of K per depth), against dedicated D = 1,
2, 4 models.

Two architectures at 32 px: tiny32 (with its patch shortcut) and the paper's (tiny32 with
model.patch_shortcut=false: encoder and decoder only). Every model trains at equal steps and
seeds with the real CLI (the rate-distortion study's runner) and is scored by `rqgen
eval-vae` on held-out images (the photos, or `--data fashion-mnist`), whose per-depth PSNRs
are the prefix decodings. The target (#29): each prefix within 0.5 dB of the dedicated model
of its depth.

    python benchmarks/prefix_depth.py --steps 150 --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/prefix_depth.py --data fashion-mnist --seeds 0 1 2 --jobs 2 --threads 1 \
        --only 'tiny32, D=8' 'tiny32, D=8, quantizer dropout' 'tiny32, D=1' 'tiny32, D=2' \
        'tiny32, D=4'
    python benchmarks/prefix_depth.py --steps 1000 --seeds 0 1 2 --jobs 3 --threads 1 --only \
        'paper architecture, D=8' 'paper architecture, D=8, quantizer dropout' \
        'paper architecture, D=8, quantizer dropout to 1, 2, 4, 8' \
        'paper architecture, D=8, separate codebooks, quantizer dropout' \
        'paper architecture, D=8, separate codebooks, quantizer dropout, d=1 4x as often' \
        'paper architecture, D=1' 'paper architecture, D=2' 'paper architecture, D=4' \
        'tiny32, D=8' 'tiny32, D=1' 'tiny32, D=2' 'tiny32, D=4'   # rate_distortion's records

Results: benchmarks/results/prefix_depth[_fashion_mnist][_1000steps].md. Reruns resume from
benchmarks/work/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import cell, parse_args, results_name, train_all  # noqa: E402

ARCHS = {"tiny32": [], "paper architecture": ["model.patch_shortcut=false"]}
DEPTHS = (1, 2, 4)
MODELS = (
    "D=8",
    "D=8, quantizer dropout",
    "D=8, quantizer dropout to 1, 2, 4, 8",
    "D=8, separate codebooks, quantizer dropout",
    "D=8, separate codebooks, quantizer dropout, d=1 4x as often",
)


def variants() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for arch, extra in ARCHS.items():
        d8 = [*extra, "model.code_depth=8"]
        dropout = [*d8, "model.quantize_dropout=true"]
        # a codebook per depth (each of K, so equal bits per code): depth 1's codebook is
        # all depth 1's, as a dedicated D = 1 model's is, not shared with seven finer scales
        separate = [*dropout, "model.shared_codebook=false"]
        out[f"{arch}, D=8"] = ("tiny32", d8)
        out[f"{arch}, D=8, quantizer dropout"] = ("tiny32", dropout)
        out[f"{arch}, D=8, quantizer dropout to 1, 2, 4, 8"] = (  # the rates compared
            "tiny32",
            [*dropout, "model.quantize_dropout_depths=[1,2,4,8]"],
        )
        out[f"{arch}, D=8, separate codebooks, quantizer dropout"] = ("tiny32", separate)
        # the same, with d = 1 listed four times: 4 of every 11 images decode from Ẑ(1)
        out[f"{arch}, D=8, separate codebooks, quantizer dropout, d=1 4x as often"] = (
            "tiny32",
            [*separate, "model.quantize_dropout_depths=[1,1,1,1,2,3,4,5,6,7,8]"],
        )
        for d in DEPTHS:
            out[f"{arch}, D={d}"] = ("tiny32", [*extra, f"model.code_depth={d}"])
    return out


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/prefix_depth")
    seeds = args.seeds or [args.seed]
    results = train_all(variants(), args, seeds)
    by = {(r["variant"], r["seed"]): r for r in results}
    rows = [
        "| architecture | model | Ẑ(1) | Ẑ(2) | Ẑ(4) | Ẑ(8) |",
        "|---|---|---|---|---|---|",
    ]
    diffs = [
        "| architecture | model | prefix − dedicated, d = 1 | d = 2 | d = 4 | none 0.5 dB below |",
        "|---|---|---|---|---|---|",
    ]
    for arch in [a for a in ARCHS if (f"{a}, D=8", seeds[0]) in by]:  # --only may pick one
        dedicated = {d: [by[f"{arch}, D={d}", s]["psnr"] for s in seeds] for d in DEPTHS}
        rows.append(
            f"| {arch} | dedicated D = 1, 2, 4 | "
            + " | ".join(cell(dedicated[d]) for d in DEPTHS)
            + " | |"
        )
        for model in [m for m in MODELS if (f"{arch}, {m}", seeds[0]) in by]:
            rs = [by[f"{arch}, {model}", s] for s in seeds]
            prefix = {d: [r["per_depth_psnr"][d - 1] for r in rs] for d in (*DEPTHS, 8)}
            rows.append(
                f"| {arch} | one {model} | "
                + " | ".join(cell(prefix[d]) for d in (*DEPTHS, 8))
                + " |"
            )
            gaps = {d: [a - b for a, b in zip(prefix[d], dedicated[d])] for d in DEPTHS}
            within = all(g >= -0.5 for d in DEPTHS for g in gaps[d])
            diffs.append(
                f"| {arch} | {model} | "
                + " | ".join(cell(gaps[d]) for d in DEPTHS)
                + f" | {'yes' if within else 'no'} |"
            )
    body = "\n".join(
        [
            f"PSNR (dB) on the {results[0]['n_images']} held-out images "
            f"({args.val_data}), {args.steps} steps at batch 64, seeds "
            f"{', '.join(map(str, seeds))}; means ± half-width of the 95% Student-t interval "
            "over seeds. A D = 8 model's Ẑ(d) is the decoding of its first d codes.",
            "",
            *rows,
            "",
            "Paired differences (same seed) of each prefix from the dedicated model:",
            "",
            *diffs,
        ]
    )
    data = {"steps": args.steps, "seeds": seeds, "runs": results}
    write_results(results_name("prefix_depth", args), body, data)


if __name__ == "__main__":
    main()
