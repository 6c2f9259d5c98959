"""Rate-distortion of stage 1 on held-out bundled photos (paper Table 4 and C.3 analogs).

Trains every variant of tiny32 at equal K and equal steps with the real CLI, then scores
each with `rqgen eval-vae` on the held-out photos (photos never seen in training).

    python benchmarks/rate_distortion.py --steps 1000 --jobs 2

Variants: RQ 8×8×D for D = 1, 2, 4, 8 (shared K = 512); VQ 16×16×1 (f = 2, K = 512) for the
Table 4 comparison; RQ 8×8×4 with four separate codebooks of K/4 = 128 (C.3).
Reruns resume unfinished trainings from benchmarks/work/.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

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


def one(name: str, overrides: list[str], args, config: str = "tiny32") -> dict:
    out = Path(args.workdir) / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    py = sys.executable
    run(
        [
            py,
            "-m",
            "rqgen",
            "train-vae",
            "--data",
            "bundled:photos",
            "--out",
            str(out),
            "--steps",
            str(args.steps),
            "--device",
            "cpu",
            "--config",
            config,
            f"train.seed={args.seed}",
            "train.num_workers=0",
            *overrides,
        ],
        args.threads,
        log,
    )
    res = json.loads(
        run(
            [
                py,
                "-m",
                "rqgen",
                "eval-vae",
                "--vae",
                str(out),
                "--data",
                "bundled:photos:val",
                "--json",
                "--device",
                "cpu",
            ],
            args.threads,
            log,
        )
    )
    res["bits_per_image"] = res["tokens_per_image"] * math.log2(res["codebook_size"])
    res["variant"] = name
    print(f"{name}: PSNR {res['psnr']:.2f} dB", flush=True)
    return res


def parse_args(doc: str, steps: int, workdir: str) -> argparse.Namespace:
    """The options every stage-1 comparison takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=workdir)
    p.add_argument("--only", nargs="*", help="subset of variant names")
    return p.parse_args()


def train_all(variants: dict[str, tuple[str, list[str]]], args) -> list[dict]:
    """Train and score {name: (preset, overrides)}, `args.jobs` at a time."""
    chosen = {k: v for k, v in variants.items() if not args.only or k in args.only}
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda kv: one(kv[0], kv[1][1], args, kv[1][0]), chosen.items()))


def main() -> None:
    args = parse_args(__doc__, 1000, "benchmarks/work/rate_distortion")
    results = train_all({k: ("tiny32", v) for k, v in VARIANTS.items()}, args)

    rows = [
        "| variant | code shape | bits/image | PSNR (dB) | SSIM | PSNR of Ẑ(1)..Ẑ(D) | "
        "codebook usage | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        depth = ", ".join(f"{v:.2f}" for v in r["per_depth_psnr"])
        rows.append(
            f"| {r['variant']} | {'×'.join(map(str, r['code_shape']))} | {r['bits_per_image']:.0f} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {depth} | {r['codebook_usage']:.0%} "
            f"| {r['perplexity']:.0f} |"
        )
    ref = results[0]
    body = (
        f"tiny32 variants, {args.steps} steps each (batch 64, Adam 4e-4, MSE + 0.25·commitment, "
        f"no LPIPS/GAN), seed {args.seed}, scored on {ref['n_images']} fixed crops of the "
        "held-out photos (bundled:photos:val).\n\n"
        + "\n".join(rows)
        + f"\n\nReference codec ({ref['reference_codec']}, 1536 bits): "
        f"{ref['reference_codec_psnr']:.2f} dB.\n"
    )
    print(write_results("rate_distortion", body, {"steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
