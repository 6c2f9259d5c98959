"""Generation quality on the bundled digits (the paper's B.3 analog, plus classifier-free
guidance): one tiny32 RQ-VAE, four class-conditional RQ-Transformers that differ only in the
training targets, each sampled with and without CFG.

A digit classifier trained on the real train split scores the samples: accuracy against
the requested class, and the Fréchet distance between its penultimate features of the
samples and of the held-out real digits (lower is better). Reference rows give the same
scores for real train digits and for the RQ-VAE's reconstructions of the held-out digits:
no sampler can beat the second.

    python benchmarks/digits_quality.py --vae-steps 400 --ar-steps 800 --jobs 2

Both stages use the demo's recipe (batch 32, no dropout) for longer. Trainings run through
the real CLI and resume from benchmarks/work/digits_quality/.
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
from common import write_results  # noqa: E402

from rqgen.data import BundledDigits  # noqa: E402
from rqgen.demo import DIGITS_AR_OVERRIDES, DIGITS_VAE_OVERRIDES  # noqa: E402
from rqgen.evaluate.digits import score_digits, train_digit_classifier  # noqa: E402
from rqgen.stage2.sampling import SamplingConfig, generate, load_for_sampling  # noqa: E402

VARIANTS = {  # name -> (soft labels, stochastic codes); τ = 0.5 where either is on
    "soft labels + stochastic codes": (True, True),
    "stochastic codes only": (False, True),
    "soft labels only": (True, False),
    "neither (one-hot, deterministic codes)": (False, False),
}
CFG_SCALES = (1.0, 2.0)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run(cmd: list, threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "rqgen", *map(str, cmd)], env=env,
                              stdout=f, stderr=f)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"rqgen {' '.join(map(str, cmd))} failed; see {log}")


def train_ar(name: str, work: Path, args) -> Path:
    soft, stochastic = VARIANTS[name]
    out = work / slug(name)
    out.mkdir(parents=True, exist_ok=True)
    run(["train-ar", "--vae", work / "vae", "--data", "bundled:digits", "--out", out,
         "--steps", args.ar_steps, "--device", "cpu", f"train.seed={args.seed}",
         f"train.soft_labels={str(soft).lower()}",
         f"train.stochastic_codes={str(stochastic).lower()}", *DIGITS_AR_OVERRIDES],
        args.threads, out / "bench.log")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--ar-steps", type=int, default=800)
    p.add_argument("--per-class", type=int, default=50, help="samples per class and setting")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="benchmarks/work/digits_quality")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run(["train-vae", "--data", "bundled:digits", "--out", work / "vae", "--steps",
         args.vae_steps, "--device", "cpu", f"train.seed={args.seed}", *DIGITS_VAE_OVERRIDES],
        os.cpu_count() or 1, work / "vae.log")  # fmt: skip
    with ThreadPoolExecutor(args.jobs) as pool:
        dirs = dict(zip(VARIANTS, pool.map(lambda n: train_ar(n, work, args), VARIANTS)))

    classifier, clf_acc = train_digit_classifier()
    train, val = BundledDigits(32, "train"), BundledDigits(32, "val")
    real = torch.stack([val[i][0] for i in range(len(val))])
    real_y = torch.tensor([val[i][1] for i in range(len(val))])
    n_ref = min(len(train), len(real))
    train_x = torch.stack([train[i][0] for i in range(n_ref)])
    train_y = torch.tensor([train[i][1] for i in range(n_ref)])
    _, vae, _, _ = load_for_sampling(next(iter(dirs.values())))
    with torch.no_grad():
        recon = vae.decode_codes(vae.encode_to_codes(real)).clamp(-1, 1)
    refs = {
        f"real train digits ({n_ref})": score_digits(classifier, train_x, train_y, real),
        "RQ-VAE reconstructions of the held-out digits": score_digits(
            classifier, recon, real_y, real
        ),
    }
    rows = [
        "| training targets | CFG | classifier accuracy | Fréchet distance | final val loss |",
        "|---|---|---|---|---|",
    ]
    results = []
    cond = torch.arange(10).repeat_interleave(args.per_class)
    for name, out in dirs.items():
        model, vae, _, _ = load_for_sampling(out)
        val_loss = _best_val_loss(out)
        for scale in CFG_SCALES:
            gen = torch.Generator().manual_seed(args.seed)
            _, images = generate(vae, model, cond, SamplingConfig(cfg_scale=scale), gen)
            s = score_digits(classifier, images, cond, real)
            results.append({"variant": name, "cfg": scale, "val_loss": val_loss, **s})
            rows.append(f"| {name} | {scale:g} | {s['accuracy']:.1%} | "
                        f"{s['frechet_distance']:.2f} | {val_loss:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
    for name, s in refs.items():
        rows.append(f"| reference: {name} | – | {s['accuracy']:.1%} | "
                    f"{s['frechet_distance']:.2f} | – |")  # fmt: skip
    body = (
        f"tiny32 RQ-VAE (8×8×4, K=512) trained {args.vae_steps} steps on bundled:digits; "
        f"ar-tiny class-conditional RQ-Transformers trained {args.ar_steps} steps each "
        f"(overrides {' '.join(DIGITS_AR_OVERRIDES)}) "
        f"(seed {args.seed}), differing only in the training targets (τ = 0.5). "
        f"{args.per_class} samples per class (top-k/top-p off, temperature 1), scored by a "
        f"digit CNN ({clf_acc:.1%} on the held-out digits) against the {len(real)} held-out "
        "digits. 'final val loss' is the best validation cross-entropy against the "
        "deterministic codes (the soft-label models are trained on a different target, so "
        "their losses are not comparable with the one-hot ones).\n\n" + "\n".join(rows)
    )
    print(write_results("digits_quality", body, {"results": results, "references": refs,
                                                  "classifier_accuracy": clf_acc}))  # fmt: skip


def _best_val_loss(out: Path) -> float:
    import json

    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return min(losses) if losses else float("nan")


if __name__ == "__main__":
    main()
