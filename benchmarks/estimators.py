"""Straight-through vs the rotation trick, from z onto Ẑ or per depth (model.gradient_estimator),
for tiny32 on the photos.

Trains each estimator at equal steps and seeds with the real CLI (the rate-distortion
study's runner: `rqgen train-vae`, then `rqgen eval-vae` on the held-out crops) and reports
PSNR, codebook usage and perplexity with 95% intervals over seeds, and the paired
differences from straight-through.

    python benchmarks/estimators.py --steps 150 --seeds 0 1 2 --jobs 2 --threads 1
    python benchmarks/estimators.py --steps 1000 --seeds 0 1 2 --jobs 2 --threads 1

Results: benchmarks/results/estimators[_1000steps].md. Reruns resume from benchmarks/work/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from rate_distortion import cell, parse_args, results_name, train_all  # noqa: E402

VARIANTS = {
    "straight-through (ste)": ["model.gradient_estimator=ste"],
    "rotation trick": ["model.gradient_estimator=rotation"],
    "rotation trick per depth": ["model.gradient_estimator=rotation_per_depth"],
}
BASE = "straight-through (ste)"
# paired differences (same seed): each estimator against straight-through, and the two rotations
PAIRS = [("rotation trick", BASE), ("rotation trick per depth", BASE),
         ("rotation trick per depth", "rotation trick")]  # fmt: skip


def training_losses(by: dict, names: list[str], seeds: list[int]) -> list[str]:
    """The training reconstruction MSE and commitment loss (β Σ_d ||z − sg[Ẑ(d)]||², Eq. 7)
    averaged over each interval between evaluations, for the runs whose records keep them:
    whether an estimator stops fitting or stops quantizing. Means over the seeds that have
    them (their number in the header)."""
    have = {n: [s for s in seeds if by[n, s].get("train_curve")] for n in names}
    cols = [n for n in names if have[n]]
    if not cols:
        return []
    curve = {(n, s): {int(t): (r, c) for t, r, c in by[n, s]["train_curve"]} for n in cols
             for s in have[n]}  # fmt: skip
    steps = sorted(set.intersection(*(set(c) for c in curve.values())))
    head = " | ".join(f"{n} ({len(have[n])} seed{'s' * (len(have[n]) > 1)})" for n in cols)
    rows = ["", "Training losses (×10⁻³), reconstruction MSE / commitment, means over the "
            "interval ending at each step:", "", f"| step | {head} |", "|---" * (len(cols) + 1)
            + "|"]  # fmt: skip
    for t in steps:
        cells = []
        for n in cols:
            r, c = zip(*(curve[n, s][t] for s in have[n]))
            cells.append(f"{1e3 * sum(r) / len(r):.2f} / {1e3 * sum(c) / len(c):.2f}")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    return rows


def stack_scales(by: dict, names: list[str], seeds: list[int]) -> list[str]:
    """How large z is and how much of it each depth leaves (mean norms on the held-out crops,
    from the records that keep them): an estimator can lower the commitment loss by
    shrinking z as well as by quantizing it better; only the ratio says which."""
    rows, depth = [], 0
    for n in names:
        have = [by[n, s].get("scales") for s in seeds]
        have = [h for h in have if h and "final_residual_norm" in h]
        if not have:
            continue
        z = [h["residual_norm"][0] for h in have]
        left = [[*h["residual_norm"][1:], h["final_residual_norm"]] for h in have]
        depth = len(left[0])
        ratios = [cell([x[d] / zz for x, zz in zip(left, z)], 3) for d in range(depth)]
        rows.append(f"| {n} | {len(have)} | {cell(z)} | " + " | ".join(ratios) + " |")
    if not rows:
        return []
    head = " | ".join(f"d = {d + 1}" for d in range(depth))
    return ["", "The code stack's scale on the held-out crops: mean ‖z‖, and the mean norm left "
            "after depth d relative to it (‖z − Ẑ(d)‖ / ‖z‖):", "",
            f"| estimator | seeds | ‖z‖ | {head} |", "|---" * (depth + 3) + "|", *rows]  # fmt: skip


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/estimators")
    seeds = args.seeds or [args.seed]
    results = train_all({k: ("tiny32", v) for k, v in VARIANTS.items()}, args, seeds)
    by = {(r["variant"], r["seed"]): r for r in results}
    names = [k for k in VARIANTS if (k, seeds[0]) in by]
    rows = [
        "| estimator | PSNR (dB) | SSIM | PSNR of Ẑ(1)..Ẑ(4), seed 0 | codebook usage "
        "| perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [by[name, s] for s in seeds]
        rows.append(
            f"| {name} | {cell([r['psnr'] for r in rs])} | {cell([r['ssim'] for r in rs], 3)} | "
            + ", ".join(f"{p:.2f}" for p in rs[0]["per_depth_psnr"])
            + f" | {cell([100 * r['codebook_usage'] for r in rs], 0)}% "
            f"| {cell([r['perplexity'] for r in rs], 0)} |"
        )
    diffs = ["| difference (dB of PSNR, same seed) | mean ± 95% interval | per seed |",
             "|---|---|---|"]  # fmt: skip
    for a, b in [(a, b) for a, b in PAIRS if {a, b} <= set(names)]:
        d = [by[a, s]["psnr"] - by[b, s]["psnr"] for s in seeds]
        diffs.append(f"| {a} − {b} | {cell(d)} | {', '.join(f'{x:+.2f}' for x in d)} |")
    # the same held-out images, scored by the trainer at each evaluation: when they part
    curves = {(n, s): dict(by[n, s].get("val_curve", [])) for n in names for s in seeds}
    kept = [n for n in names if all(curves[n, s] for s in seeds)]
    paired = [n for n in kept if n != BASE] if BASE in kept else []
    steps = []
    if kept:
        steps = sorted(set.intersection(*(set(curves[n, s]) for n in kept for s in seeds)))
    during = [
        "| step | " + " | ".join(kept) + "".join(f" | {n} − {BASE}" for n in paired) + " |",
        "|---" * (len(kept) + len(paired) + 1) + "|",
    ]
    for t in steps:
        each = {n: [curves[n, s][t] for s in seeds] for n in kept}
        gaps = [[x - y for x, y in zip(each[n], each[BASE])] for n in paired]
        during.append(
            f"| {t} | " + " | ".join(cell(each[n]) for n in kept)
            + "".join(f" | {cell(g)}" for g in gaps) + " |"
        )  # fmt: skip
    missing = [n for n in names if n not in kept]
    losses = training_losses(by, names, seeds) + stack_scales(by, names, seeds)
    body = "\n".join([
        f"tiny32 (8×8×4, K = 512, the preset's recipe) on the bundled photos, {args.steps} steps "
        f"at batch 64, seeds {', '.join(map(str, seeds))}, scored on the "
        f"{results[0]['n_images']} fixed crops of the held-out photos; means ± half-width of "
        "the 95% Student-t interval over seeds.",
        "",
        *rows,
        "",
        *diffs,
        "",
        "Held-out PSNR (dB) during training, as the trainer scores the same images at each "
        "evaluation" + (f" (not kept for {', '.join(missing)})" if missing else "") + ":",
        "",
        *(during if steps else ["(not kept in these runs' records)"]),
        *losses,
    ])  # fmt: skip
    write_results(results_name("estimators", args), body, {"runs": results})


if __name__ == "__main__":
    main()
