"""Rate-distortion of stage 1 on held-out images (paper Table 4 and C.3 analogs).

Trains every variant of tiny32 at equal K and equal steps with the real CLI, then scores
each with `rqgen eval-vae` on held-out images no training saw: the bundled photos, or
(`--data fashion-mnist`) 1000 Fashion-MNIST test images after training on 10000 of its
training images (Debian's dataset-fashion-mnist, installed when missing).

    python benchmarks/rate_distortion.py --steps 150 --seeds 0 1 2 --jobs 2
    python benchmarks/rate_distortion.py --data fashion-mnist --steps 150 --seeds 0 1 2

Variants: RQ 8×8×D for D = 1, 2, 4, 8 (shared K = 512); VQ 16×16×1 (f = 2, K = 512) for the
Table 4 comparison; RQ 8×8×4 with four separate codebooks of K/4 = 128 (C.3: the same number
of code vectors as the shared one), and with one shared codebook of 128 (the same bits as the
separate ones). With several seeds: means with 95% Student-t intervals
and paired differences (same seed) for each trend the paper claims.
Reruns resume unfinished trainings from benchmarks/work/; finished ones are kept as records
in benchmarks/results/runs/ (benchmarks/ledger.py), so a fresh checkout skips them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
from common import fashion_mnist, interval, write_results  # noqa: E402

VARIANTS = {
    "RQ 8x8x1": ["model.code_depth=1"],
    "RQ 8x8x2": ["model.code_depth=2"],
    "RQ 8x8x4": ["model.code_depth=4"],
    "RQ 8x8x8": ["model.code_depth=8"],
    "VQ 16x16x1 (f=2)": ["model.code_depth=1", "model.ch_mult=[1,2]"],
    "RQ 8x8x4, 4 separate codebooks of 128": [
        "model.code_depth=4",
        "model.shared_codebook=false",
        "model.codebook_size=128",
    ],
    # the separate codebooks' bits (4 x 7 per position) in one shared codebook
    "RQ 8x8x4, shared K=128": ["model.code_depth=4", "model.codebook_size=128"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run(cmd: list[str], threads: int, log: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    return proc.stdout


def run_dir(args, name: str, seed: int) -> Path:
    """Where a variant trains: the workdir itself for --seed, a seedN/ folder for others."""
    return Path(args.workdir) / (slug(name) if seed == args.seed else f"seed{seed}/{slug(name)}")


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def val_curve(out: Path) -> list[list[float]]:
    """[step, held-out PSNR] at each evaluation the trainer logged in run folder `out`."""
    return [[r["step"], r["val_psnr"]] for r in metrics(out) if "val_psnr" in r]


def train_curve(out: Path) -> list[list[float]]:
    """[step, reconstruction loss, commitment loss] at each evaluation: the means of the
    training losses logged since the previous one, so a curve says whether a model stopped
    fitting its training images or stopped quantizing them well."""
    rows, curve, start = metrics(out), [], 0
    for t in [r["step"] for r in rows if "val_psnr" in r]:
        span = [r for r in rows if start < r["step"] <= t and "rec" in r]
        if span:
            curve.append([t, *(sum(r[k] for r in span) / len(span) for k in ("rec", "commit"))])
        start = t
    return curve


def one(name: str, overrides: list[str], args, config: str = "tiny32", seed=None,
        keep_model: bool = False) -> dict:  # fmt: skip
    """Train (or resume) and score one run; a run with a record is not trained again unless
    the study reads its model folder afterwards (`keep_model`)."""
    seed = args.seed if seed is None else seed
    out = run_dir(args, name, seed)
    settings = run_settings(overrides, seed)
    key = run_key(config, overrides, args, seed)
    kept = ledger.get(key)
    if kept is not None and not (keep_model or (out / "model.safetensors").is_file()):
        print(f"{name}: PSNR {kept['psnr']:.2f} dB (kept record)", flush=True)
        return {**kept, "variant": name, "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    py = sys.executable
    run(
        [py, "-m", "rqgen", "train-vae", "--data", args.train_data, "--out", str(out),
         "--steps", str(args.steps), "--device", "cpu", "--config", config, *settings],
        args.threads,
        log,
    )  # fmt: skip
    return {**ledger.put(key, score(name, out, args, seed)), "variant": name, "seed": seed}


def run_key(config: str, overrides: list[str], args, seed: int) -> dict:
    """The ledger key of one run as `one` trains it."""
    settings = [*run_settings(overrides, seed), f"train.steps={args.steps}"]
    return ledger.run_key(config, settings, args.data)


def run_settings(overrides: list[str], seed: int) -> list[str]:
    return [f"train.seed={seed}", "train.num_workers=0", *overrides]


def recorded(variants: dict[str, tuple[str, list[str]]], args, seeds: list[int]) -> list[dict]:
    """The kept records of those `variants` that have one at every seed; nothing trains."""
    out = []
    for name, (config, overrides) in variants.items():
        kept = [ledger.get(run_key(config, overrides, args, s)) for s in seeds]
        if all(kept):
            out += [{**r, "variant": name, "seed": s} for r, s in zip(kept, seeds)]
    return out


def score(name: str, out: Path, args, seed: int) -> dict:
    """`rqgen eval-vae` of the model in `out` on the held-out images, as a result row. The
    scores are kept in `out/eval.json` beside the model file's size and time and the data, so
    a rerun (another table from the same runs) scores a model again only when it changed;
    delete the file to rescore after changing the evaluation itself."""
    weights = (out / "model.safetensors").stat()
    key = {"weights": [weights.st_size, weights.st_mtime_ns], "data": args.val_data}
    kept = out / "eval.json"
    saved = json.loads(kept.read_text()) if kept.exists() else {}
    if saved.get("key") == key:
        res = saved["result"]
    else:
        cmd = [sys.executable, "-m", "rqgen", "eval-vae", "--vae", str(out), "--data",
               args.val_data, "--json", "--device", "cpu"]  # fmt: skip
        res = json.loads(run(cmd, args.threads, out / "bench.log"))
        tmp = kept.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": res}))
        tmp.replace(kept)
    res["bits_per_image"] = res["tokens_per_image"] * math.log2(res["codebook_size"])
    res["val_curve"] = val_curve(out)
    res["train_curve"] = train_curve(out)
    if json.loads((out / "config.json").read_text()).get("model_type") == "rqvae":
        res["scales"] = residual_scales(out, args.val_data)
    res["variant"], res["seed"] = name, seed
    print(f"{name}: PSNR {res['psnr']:.2f} dB", flush=True)
    return res


def parse_args(doc: str, steps: int, workdir: str) -> argparse.Namespace:
    """The options every stage-1 comparison takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", help="several seeds (default: --seed)")
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--only", nargs="*", help="variants to train; the rest join from records")
    p.add_argument("--data", choices=["photos", "fashion-mnist"], default="photos")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # this process's work too; the table says so
    args.default_steps = steps
    if args.steps != steps:  # never resume a run of another length
        args.workdir += f"_{args.steps}steps"
    choose_data(args)
    return args


def results_name(base: str, args: argparse.Namespace) -> str:
    """benchmarks/results name of a study: suffixed by its data and by its steps when they
    are not the study's default, so a longer run never overwrites the default table."""
    data = "" if args.data == "photos" else "_" + slug(args.data)
    steps = "" if args.steps == args.default_steps else f"_{args.steps}steps"
    return base + data + steps


def choose_data(args: argparse.Namespace) -> None:
    """args.train_data / val_data for `args.data`: the bundled photos, or 10000 Fashion-MNIST
    training images and 1000 of its test images (in a workdir of their own)."""
    args.train_data, args.val_data = "bundled:photos", "bundled:photos:val"
    if args.data != "photos":
        args.workdir += "_" + slug(args.data)
        train, val = fashion_mnist(Path(args.workdir) / "data", 10000, 1000)
        args.train_data, args.val_data = str(train), str(val)


def train_all(
    variants: dict[str, tuple[str, list[str]]], args, seeds=None, keep_models=()
) -> list[dict]:
    """Train and score {name: (preset, overrides)} for each seed, `args.jobs` at a time;
    `keep_models`: the variants whose model folders the study reads afterwards. With --only,
    the other variants join from their records where every seed has one, so a table rebuilt
    after training a few variants keeps the rest."""
    seeds = seeds or [args.seed]
    chosen = [(k, v, seed) for seed in seeds for k, v in variants.items()
              if not args.only or k in args.only]  # fmt: skip
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda c: one(c[0], c[1][1], args, c[1][0], c[2], c[0] in keep_models), chosen
        ))  # fmt: skip
    others = {k: v for k, v in variants.items() if args.only and k not in args.only}
    return results + recorded(others, args, seeds)


def cell(values: list[float], digits: int = 2) -> str:
    m, h = interval(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


# the paper's trends as paired differences (same seed): (label, variant a, variant b)
TRENDS = [
    ("D 2 - D 1", "RQ 8x8x2", "RQ 8x8x1"),
    ("D 4 - D 2", "RQ 8x8x4", "RQ 8x8x2"),
    ("D 8 - D 4", "RQ 8x8x8", "RQ 8x8x4"),
    ("RQ 8x8x4 - VQ 16x16x1 (Table 4)", "RQ 8x8x4", "VQ 16x16x1 (f=2)"),
    ("shared - separate (C.3)", "RQ 8x8x4", "RQ 8x8x4, 4 separate codebooks of 128"),
    (
        "shared K=128 - separate 4x128 (equal bits)",
        "RQ 8x8x4, shared K=128",
        "RQ 8x8x4, 4 separate codebooks of 128",
    ),
]


def residual_scales(model_dir: Path, data: str) -> dict:
    """Why a shared codebook can lose to separate ones: the mean norm of the residual entering
    each depth, the median code norm of each codebook, and the distinct codes each depth picks
    on the held-out crops; and the mean norm of what is left after the last depth."""
    from rqgen.data import build_dataset
    from rqgen.stage1.rqvae import RQVAE

    m = RQVAE.from_pretrained(model_dir).eval()
    val = torch.stack([v for v, _ in build_dataset(data, m.config.resolution, "val")])
    q = m.quantizer
    with torch.no_grad():
        codes, residuals = q.quantize(m.encode(val).reshape(-1, q.dim))
        left = residuals[:, -1] - q.embed(codes)[:, -1]  # r_D = z − Ẑ(D)
    return {
        "residual_norm": [
            round(float(residuals[:, d].norm(dim=-1).mean()), 3) for d in range(q.depth)
        ],  # fmt: skip
        "median_code_norm": [round(float(book.norm(dim=-1).median()), 3) for book in q.codebook],
        "distinct_codes": [int(codes[:, d].unique().numel()) for d in range(q.depth)],
        "final_residual_norm": round(float(left.norm(dim=-1).mean()), 4),
    }


def trained_at(results: list[dict]) -> str:
    """The commits at which the runs were kept (a study may gather them over sittings)."""
    commits = {r["commit"] for r in results if r.get("commit")}
    if not commits:
        return ""
    return (
        "\nRuns kept (benchmarks/results/runs/) at commit "
        + ", ".join(
            f"{c} ({sum(r.get('commit') == c for r in results)} of them)" for c in sorted(commits)
        )
        + ".\n"
    )


def main() -> None:
    args = parse_args(__doc__, 150, "benchmarks/work/rate_distortion")
    seeds = args.seeds or [args.seed]
    results = train_all({k: ("tiny32", v) for k, v in VARIANTS.items()}, args, seeds)
    by = {(r["variant"], r["seed"]): r for r in results}
    names = [k for k in VARIANTS if (k, seeds[0]) in by]
    rows = [
        "| variant | code shape | bits/image | PSNR (dB) | SSIM | PSNR of Ẑ(1)..Ẑ(D) (means) | "
        "partials rise at every depth | codebook usage | perplexity | unquantized PSNR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [by[name, s] for s in seeds]
        depth = ", ".join(f"{interval([r['per_depth_psnr'][d] for r in rs])[0]:.2f}"
                          for d in range(len(rs[0]["per_depth_psnr"])))  # fmt: skip
        rising = sum(all(b > a for a, b in zip(r["per_depth_psnr"], r["per_depth_psnr"][1:]))
                     for r in rs)  # fmt: skip
        r0 = rs[0]
        rows.append(
            f"| {name} | {'×'.join(map(str, r0['code_shape']))} | {r0['bits_per_image']:.0f} "
            f"| {cell([r['psnr'] for r in rs])} | {cell([r['ssim'] for r in rs], 3)} | {depth} "
            f"| {rising} of {len(rs)} | {cell([100 * r['codebook_usage'] for r in rs], 0)}% "
            f"| {cell([r['perplexity'] for r in rs], 0)} "
            f"| {cell([r.get('unquantized_psnr', float('nan')) for r in rs])} |"
        )
    ref = results[0]
    bicubic = ref["reference_codec_psnr"]
    trends = ["| difference (dB of PSNR, same seed) | mean ± 95% interval | per seed |",
              "|---|---|---|"]  # fmt: skip
    pairs = [(label, a, b) for label, a, b in TRENDS if (a, seeds[0]) in by and (b, seeds[0]) in by]
    if ("RQ 8x8x4", seeds[0]) in by:
        pairs.append(("RQ 8x8x4 - bicubic 8x8 codec", "RQ 8x8x4", None))
    for label, a, b in pairs:
        diffs = [by[a, s]["psnr"] - (bicubic if b is None else by[b, s]["psnr"]) for s in seeds]
        trends.append(f"| {label} | {cell(diffs)} | {', '.join(f'{d:+.2f}' for d in diffs)} |")
    body = (
        f"tiny32 variants (the preset's recipe: Adam (0.9, 0.99), lr 1e-3 cosine, zero-init "
        f"residual branches, linear patch shortcut; MSE + 0.25·commitment, no LPIPS/GAN), "
        f"{args.steps} steps each at batch 64, seeds {', '.join(map(str, seeds))}, each run "
        f"scored on the {ref['n_images']} fixed crops of the held-out {args.data} "
        f"({args.val_data}). Means ± half-width of the 95% Student-t interval over seeds.\n\n"
        + "\n".join(rows)
        + f"\n\nReference codec ({ref['reference_codec']}, 1536 bits): {bicubic:.2f} dB.\n\n"
        "The paper's trends, as paired differences:\n\n" + "\n".join(trends) + "\n"
    )
    pair = [
        by.get((n, seeds[0]), {}) for n in ("RQ 8x8x4", "RQ 8x8x4, 4 separate codebooks of 128")
    ]
    scales = {r["variant"]: r["scales"] for r in pair if "scales" in r}
    if scales:
        body += "\nResidual scales (seed " + str(seeds[0]) + ", held-out crops):\n\n" + "\n".join(
            f"- {name}: mean residual norm entering depth 1..D {v['residual_norm']}; median "
            f"code norm per codebook {v['median_code_norm']}; distinct codes picked per depth "
            f"{v['distinct_codes']}" for name, v in scales.items()) + "\n"  # fmt: skip
    body += trained_at(results)
    data = {"steps": args.steps, "seeds": seeds, "results": results, "scales": scales}
    print(write_results(results_name("rate_distortion", args), body, data))


if __name__ == "__main__":
    main()
