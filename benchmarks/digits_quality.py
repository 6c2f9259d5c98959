"""Generation quality on the bundled digits (the paper's B.3 analog, plus classifier-free
guidance): one tiny32 RQ-VAE, four class-conditional RQ-Transformers that differ only in the
training targets, each sampled with and without CFG.

A digit classifier trained on the real train split scores the samples: accuracy against
the requested class, and the Fréchet distance between its penultimate features of the
samples and of the held-out real digits (lower is better). Reference rows give the same
scores for real train digits and for the RQ-VAE's reconstructions of the held-out digits:
no sampler can beat the second.

    python benchmarks/digits_quality.py --vae-steps 400 --ar-steps 800 --jobs 2

With several `--seeds` every seed trains its own RQ-VAE and transformers, and the table gives
each score's mean with a 95% interval over seeds (Student t) and each variant's paired
difference from "neither" (same seed, same VAE), the soft-label study of #16:

    python benchmarks/digits_quality.py --seeds 0 1 2 --vae-steps 150 --ar-steps 400 \
        --variants "soft labels + stochastic codes" \
        "soft labels + stochastic codes, τ in quantization-error units" \
        "neither (one-hot, deterministic codes)" --name digits_soft_labels

Both stages use the demo's recipe (batch 32, no dropout). Trainings run through the real CLI
and resume from benchmarks/work/<name>/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interval, write_results  # noqa: E402

from rqgen.data import BundledDigits  # noqa: E402
from rqgen.demo import (  # noqa: E402
    DIGITS_AR_OVERRIDES,
    DIGITS_STAGE1_OVERRIDES,
    DIGITS_VAE_OVERRIDES,
)
from rqgen.evaluate.digits import score_digits, train_digit_classifier  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402

# name -> (soft labels, stochastic codes, unit of τ or None where τ is unused); τ = 0.5
QE = "quantization_error"
VARIANTS = {
    "soft labels + stochastic codes": (True, True, "absolute"),
    "soft labels + stochastic codes, τ in quantization-error units": (True, True, QE),
    "stochastic codes only": (False, True, "absolute"),
    "soft labels only": (True, False, "absolute"),
    "neither (one-hot, deterministic codes)": (False, False, None),  # τ unused
}
CFG_SCALES = (1.0, 2.0)


def slug(name: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name).strip("_").lower()


def run(cmd: list, threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "rqgen", *map(str, cmd)], env=env,
                              stdout=f, stderr=f)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"rqgen {' '.join(map(str, cmd))} failed; see {log}")


def train_ar(name: str, work: Path, seed: int, args) -> Path:
    soft, stochastic, unit = VARIANTS[name]
    out = work / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    run(["train-ar", "--vae", work / "vae", "--data", "bundled:digits", "--out", out,
         "--steps", args.ar_steps, "--device", "cpu", f"train.seed={seed}",
         f"train.soft_labels={str(soft).lower()}",
         f"train.stochastic_codes={str(stochastic).lower()}", *DIGITS_AR_OVERRIDES,
         *([f"train.tau_unit={unit}"] if unit else [])],
        args.threads, out / "bench.log")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--ar-steps", type=int, default=800)
    p.add_argument("--per-class", type=int, default=50, help="samples per class and setting")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    default = [v for v in VARIANTS if VARIANTS[v][2] != QE]
    p.add_argument("--variants", nargs="+", default=default, choices=list(VARIANTS))
    p.add_argument("--name", default="digits_quality", help="results file and work dir name")
    p.add_argument("--workdir", default=None, help="default benchmarks/work/<name>")
    args = p.parse_args()
    root = Path(args.workdir or f"benchmarks/work/{args.name}")
    classifier, clf_acc = train_digit_classifier()
    train, val = BundledDigits(32, "train"), BundledDigits(32, "val")
    real = torch.stack([val[i][0] for i in range(len(val))])
    cond = torch.arange(10).repeat_interleave(args.per_class)
    results, refs = [], {}
    for seed in args.seeds:
        work = root / f"seed{seed}" if len(args.seeds) > 1 else root
        work.mkdir(parents=True, exist_ok=True)
        run(["train-vae", "--data", "bundled:digits", "--out", work / "vae", "--steps",
             args.vae_steps, "--device", "cpu", f"train.seed={seed}", *DIGITS_VAE_OVERRIDES,
             *DIGITS_STAGE1_OVERRIDES],
            os.cpu_count() or 1, work / "vae.log")  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            outs = pool.map(lambda n, w=work, s=seed: train_ar(n, w, s, args), args.variants)
            dirs = dict(zip(args.variants, outs))
        for name, out in dirs.items():
            pipe = RQPipeline.from_pretrained(out, device="cpu", dtype="fp32")
            val_loss = _best_val_loss(out)
            for scale in CFG_SCALES:
                gen = torch.Generator().manual_seed(seed)
                _, images = pipe.sample(cond, SamplingConfig(guidance_scale=scale), gen)
                s = score_digits(classifier, images, cond, real)
                results.append({"variant": name, "seed": seed, "cfg": scale,
                                "val_loss": val_loss, **s})  # fmt: skip
                print(results[-1], flush=True)
        if seed == args.seeds[0]:
            refs = references(classifier, train, val, real, pipe.vae)
    rows = table(results, refs, args)
    body = (
        f"tiny32 RQ-VAE (8×8×4, K=512) trained {args.vae_steps} steps on bundled:digits; "
        f"ar-tiny class-conditional RQ-Transformers trained {args.ar_steps} steps each "
        f"(overrides {' '.join(DIGITS_AR_OVERRIDES)}), differing only in the training targets "
        "(τ = 0.5; absolute unless the variant says otherwise); seeds "
        f"{', '.join(map(str, args.seeds))} (each "
        f"seed its own RQ-VAE). {args.per_class} samples per class (top-k/top-p off, "
        f"temperature 1), scored by a digit CNN ({clf_acc:.1%} on the held-out digits) "
        f"against the {len(real)} held-out digits. 'val NLL' is the best validation "
        "cross-entropy against the deterministic (hard) codes, nats per code."
        + (
            " With several seeds: mean ± half-width of the 95% Student-t interval over seeds, "
            "and each variant's paired difference from 'neither' (same seed)."
            if len(args.seeds) > 1
            else ""
        )  # fmt: skip
        + "\n\n"
        + "\n".join(rows)
    )
    print(write_results(args.name, body, {"results": results, "references": refs,
                                           "classifier_accuracy": clf_acc}))  # fmt: skip


def references(classifier, train, val, real, vae) -> dict:
    """Scores of real train digits and of the RQ-VAE's reconstructions of the held-out ones:
    no sampler can beat the second."""
    real_y = torch.tensor([val[i][1] for i in range(len(val))])
    n_ref = min(len(train), len(real))
    train_x = torch.stack([train[i][0] for i in range(n_ref)])
    train_y = torch.tensor([train[i][1] for i in range(n_ref)])
    with torch.no_grad():
        recon = vae.decode_codes(vae.encode_to_codes(real)).clamp(-1, 1)
    return {
        f"real train digits ({n_ref})": score_digits(classifier, train_x, train_y, real),
        "RQ-VAE reconstructions of the held-out digits (first seed)": score_digits(
            classifier, recon, real_y, real
        ),
    }


def table(results: list[dict], refs: dict, args) -> list[str]:
    rows = ["| training targets | CFG | classifier accuracy | Fréchet distance | val NLL |",
            "|---|---|---|---|---|"]  # fmt: skip
    keys = ("accuracy", "frechet_distance", "val_loss")

    def cell(key: str, values: list[float]) -> str:
        m, h = interval(values)
        pct = key == "accuracy"
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
        return fmt(m) + (f" ± {fmt(h)}" if len(values) > 1 else "")

    base = "neither (one-hot, deterministic codes)"
    for name in args.variants:
        for scale in CFG_SCALES:
            mine = [r for r in results if r["variant"] == name and r["cfg"] == scale]
            cells = " | ".join(cell(k, [r[k] for r in mine]) for k in keys)
            rows.append(f"| {name} | {scale:g} | {cells} |")
            if len(args.seeds) > 1 and name != base and base in args.variants:
                ref = {r["seed"]: r for r in results if r["variant"] == base and r["cfg"] == scale}
                diffs = {k: [r[k] - ref[r["seed"]][k] for r in mine] for k in keys}
                cells = " | ".join(cell(k, diffs[k]) for k in keys)
                rows.append(f"| – minus 'neither', paired | {scale:g} | {cells} |")
    for name, s in refs.items():
        rows.append(f"| reference: {name} | – | {s['accuracy']:.1%} | "
                    f"{s['frechet_distance']:.2f} | – |")  # fmt: skip
    return rows


def _best_val_loss(out: Path) -> float:
    import json

    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return min(losses) if losses else float("nan")


if __name__ == "__main__":
    main()
