"""A shared codebook with per-depth scales (model.depth_scale) against separate codebooks at
equal bits, on the photos or Fashion-MNIST.

Trains tiny32 (8×8×4) at equal steps and seeds with the real CLI (the rate-distortion
study's runner: `rqgen train-vae`, then `rqgen eval-vae` on held-out images): four separate
codebooks of 128, one shared codebook of 128 (the same 28 bits per position), and the shared
128 with depth scales; the scaled shared and the separate codebooks again with Eq. 7's
commitment to the decoded sum only (model.commitment=final). Then two refits of each
separate model's codebook at its frozen encoder and decoder (`rqgen refit-codebook`: 1000
EMA updates on training crops, then 10 least-squares iterations): one shared, scaled
codebook of 128, and four separate ones again (the control: what the refit itself costs).
Reports PSNR, per-depth PSNR, codebook usage and the distinct codes each depth picks, with
95% intervals over seeds and paired differences.

    python benchmarks/depth_scale.py --steps 150 --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/depth_scale.py --data fashion-mnist --steps 150 --seeds 0 1 2
    python benchmarks/depth_scale.py --steps 1000 --seeds 0 1 2 --only \
        "4 separate codebooks of 128" "shared K=128, depth_scale=true"   # the preset's steps
    python benchmarks/depth_scale.py --steps 1000 --seeds 0 1 2 --only \
        "4 separate codebooks of 128" "separate, refit" "shared K=128, refit from separate"
    python benchmarks/depth_scale.py --steps 1000 --seeds 0 1 2 --only \
        "4 separate codebooks of 128" "shared K=128, depth_scale=true, commitment=final" \
        "4 separate codebooks of 128, commitment=final"

Results: benchmarks/results/depth_scale[_fashion_mnist][_1000steps].md. Reruns resume from
benchmarks/work/.
"""

from __future__ import annotations

import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import (  # noqa: E402
    cell,
    parse_args,
    results_name,
    run,
    run_dir,
    score,
    train_all,
)

SEPARATE, SHARED, SCALED = (
    "4 separate codebooks of 128",
    "shared K=128",
    "shared K=128, depth_scale=true",
)
K128 = ["model.code_depth=4", "model.codebook_size=128"]
# Eq. 7's commitment to the decoded sum only (model.commitment=final), both ways
SCALED_FINAL = "shared K=128, depth_scale=true, commitment=final"
SEPARATE_FINAL = "4 separate codebooks of 128, commitment=final"
VARIANTS = {
    SEPARATE: [*K128, "model.shared_codebook=false"],
    SHARED: K128,
    SCALED: [*K128, "model.depth_scale=true"],
    SCALED_FINAL: [*K128, "model.depth_scale=true", "model.commitment=final"],
    SEPARATE_FINAL: [*K128, "model.shared_codebook=false", "model.commitment=final"],
}
# new codebooks for the separate model of the same seed, at its frozen autoencoder
AFTER, CONTROL = "shared K=128, refit from separate", "separate, refit"
REFITS = {AFTER: ["model.shared_codebook=true", "model.depth_scale=true"], CONTROL: []}
PAIRS = [(SCALED, SEPARATE), (SCALED, SHARED), (SHARED, SEPARATE), (AFTER, SEPARATE),
         (AFTER, CONTROL), (AFTER, SCALED), (SCALED_FINAL, SEPARATE),
         (SCALED_FINAL, SEPARATE_FINAL), (SCALED_FINAL, SCALED),
         (SEPARATE_FINAL, SEPARATE)]  # fmt: skip


def refit(args, seeds: list[int]) -> list[dict]:
    """Each wanted refit of each seed's separate model, `args.jobs` at a time."""
    jobs = [(k, s) for s in seeds for k in REFITS if not args.only or k in args.only]

    def one_refit(job: tuple[str, int]) -> dict:
        name, seed = job
        out = run_dir(args, name, seed)
        if not (out / "config.json").is_file():  # written last; refit wants a new --out
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "rqgen", "refit-codebook", "--vae",
                   str(run_dir(args, SEPARATE, seed)), "--data", args.train_data, "--out",
                   str(out), "--seed", str(seed), "--device", "cpu", *REFITS[name]]  # fmt: skip
            run(cmd, args.threads, out.with_name(out.name + ".log"))
        return score(name, out, args, seed)

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one_refit, jobs))


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/depth_scale")
    seeds = args.seeds or [args.seed]
    if args.only and set(args.only) & set(REFITS):
        args.only = [*args.only, SEPARATE]  # what they start from
    variants = {k: ("tiny32", v) for k, v in VARIANTS.items()}
    results = train_all(variants, args, seeds, keep_models=[SEPARATE])  # the refits' start
    results += refit(args, seeds)
    by = {(r["variant"], r["seed"]): r for r in results}
    rows = [
        "| variant | bits/image | PSNR (dB) | SSIM | PSNR of Ẑ(1)..Ẑ(4) (means) | codebook usage "
        "| distinct codes per depth, seed " + str(seeds[0]) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    trained = [k for k in [*VARIANTS, *REFITS] if all((k, s) in by for s in seeds)]
    for name in trained:
        rs = [by[name, s] for s in seeds]
        depth = ", ".join(
            f"{cell([r['per_depth_psnr'][d] for r in rs]).split(' ')[0]}" for d in range(4)
        )
        rows.append(
            f"| {name} | {rs[0]['bits_per_image']:.0f} | {cell([r['psnr'] for r in rs])} "
            f"| {cell([r['ssim'] for r in rs], 3)} | {depth} "
            f"| {cell([100 * r['codebook_usage'] for r in rs], 0)}% "
            f"| {rs[0].get('scales', {}).get('distinct_codes', 'not kept')} |"
        )
    diffs = [
        "| difference (dB of PSNR, same seed) | mean ± 95% interval | per seed |",
        "|---|---|---|",
    ]
    for a, b in (pair for pair in PAIRS if set(pair) <= set(trained)):
        d = [by[a, s]["psnr"] - by[b, s]["psnr"] for s in seeds]
        diffs.append(f"| {a} − {b} | {cell(d)} | {', '.join(f'{x:+.2f}' for x in d)} |")
    body = "\n".join(
        [
            f"tiny32 (8×8×4, the preset's recipe) on {args.data}, {args.steps} steps at batch 64, "
            f"seeds {', '.join(map(str, seeds))}, scored on the {results[0]['n_images']} "
            f"held-out images ({args.val_data}); means ± half-width of the 95% Student-t "
            "interval over seeds. Refits: `rqgen refit-codebook` (1000 EMA updates at batch "
            "64, then 10 least-squares iterations; encoder and decoder frozen) of the separate "
            "model of the same seed.",
            "",
            *rows,
            "",
            *diffs,
        ]
    )
    name = results_name("depth_scale", args)
    write_results(name, body, {"steps": args.steps, "seeds": seeds, "runs": results})


if __name__ == "__main__":
    main()
