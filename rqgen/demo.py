"""The main job (`make demo`): train the tiny32 RQ-VAE on bundled photos and show it.

Writes under OUT/: `vae/` (the model), `reconstructions/` (pairs and coarse-to-fine strips of
held-out photos), `eval.json` (eval-vae on held-out photos) and prints where they are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rqgen.configs import load_vae_experiment
from rqgen.data import build_dataset
from rqgen.evaluate.vae import evaluate_vae, write_reconstructions
from rqgen.stage1.rqvae import RQVAE
from rqgen.train.vae import train_vae

DEMO_STEPS = 300  # about 6 minutes on 2 CPU cores


def run_demo(out: Path, steps: int | None = None) -> dict:
    start = time.time()
    exp = load_vae_experiment("tiny32", [f"train.steps={steps or DEMO_STEPS}"])
    vae_dir = train_vae(exp, "bundled:photos", out / "vae")
    vae = RQVAE.from_pretrained(vae_dir)

    val = build_dataset("bundled:photos:val", vae.config.resolution, split="val")
    n = 12
    images = torch.stack([val[i][0] for i in range(n)])
    write_reconstructions(vae, images, [f"val{i:02d}" for i in range(n)], out / "reconstructions")
    result = evaluate_vae(vae, val, progress=False)
    result["train_seconds_total"] = round(time.time() - start, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")

    print("\nrqgen demo finished in", f"{time.time() - start:.0f}s")
    print(f"  model            {out / 'vae'}  (RQVAE.from_pretrained)")
    print(f"  training log     {out / 'vae' / 'metrics.jsonl'}")
    print(f"  reconstructions  {out / 'reconstructions'}  (*_pair.png, *_coarse_to_fine.png)")
    print(f"  evaluation       {out / 'eval.json'}")
    print(
        f"  held-out PSNR {result['psnr']:.2f} dB (per depth: "
        + ", ".join(f"{p:.2f}" for p in result["per_depth_psnr"])
        + f"); 8x8 bicubic codec {result['reference_codec_psnr']:.2f} dB; "
        f"codebook usage {result['codebook_usage']:.0%}"
    )
    return result
