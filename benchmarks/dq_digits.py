"""DQ-Transformer next to RQ-Transformer on the bundled digits: sample quality and speed.

Both pipelines run the digits demo at the same budget (`rqgen demo` vs `rqgen demo --dq`:
150 VAE steps, 400 transformer steps, batch 32, 6 transformer layers of width 128: RQ 4
spatial + 2 depth, DQ 2 position + 4 content), then draw 50 samples per class with CFG 1 and
2, scored by the digit classifier trained on real digits (accuracy of the requested class,
Fréchet distance of its features to the held-out digits). Speed: images/s of the KV-cached
samplers of the trained models, codes only (no decoding), after one warm-up batch.

    python benchmarks/dq_digits.py            # trains both (2 processes), then times them
    python benchmarks/dq_digits.py --speed-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def train(kind: str, workdir: str, per_class: int) -> dict:
    torch.set_num_threads(1)
    from rqgen.demo import run_demo

    return run_demo(Path(workdir) / kind, dq=kind == "dq", per_class=per_class)


@torch.no_grad()
def images_per_second(ar_dir: Path, batch: int, repeats: int) -> float:
    from rqgen.pipeline import RQPipeline
    from rqgen.stage2.guidance import SamplingConfig

    pipe = RQPipeline.from_pretrained(ar_dir, device="cpu", dtype="fp32")
    cond, sampling = torch.arange(batch) % 10, SamplingConfig()
    pipe.family.sample(pipe.model, cond, sampling, torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    for r in range(repeats):
        pipe.family.sample(pipe.model, cond, sampling, torch.Generator().manual_seed(r))
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="benchmarks/work/dq_digits")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--speed-only", action="store_true", help="reuse trained models")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--only", nargs="*", default=["rq", "dq"], help="pipelines to (re)run")
    args = p.parse_args()
    work = Path(args.workdir)
    if not args.speed_only:
        with ProcessPoolExecutor(2) as pool:
            jobs = {k: pool.submit(train, k, args.workdir, args.per_class) for k in args.only}
            for k, job in jobs.items():
                (work / f"{k}.json").write_text(json.dumps(job.result(), indent=2))
    metrics = {k: json.loads((work / f"{k}.json").read_text()) for k in ("rq", "dq")}
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    speed = {
        k: {b: images_per_second(work / k / "ar", b, max(1, 64 // b)) for b in args.batches}
        for k in ("rq", "dq")
    }

    rows = [
        "| model | tokens/image | VAE held-out PSNR | CFG 1: accuracy / FD "
        "| CFG 2: accuracy / FD |",
        "|---|---|---|---|---|",
    ]
    names = {"rq": "RQ-VAE 8×8×4 + RQ-Transformer", "dq": "DQ-VAE 4×4/8×8 + DQ-Transformer"}
    for k, m in metrics.items():
        s1, g = m["stage1_heldout"], m["generation"]
        tokens = s1.get("tokens_per_image", 256)
        cells = [
            f"{g[n]['accuracy']:.1%} / {g[n]['frechet_distance']:.2f}"
            for n in ("samples", "samples_cfg2")
        ]
        rows.append(f"| {names[k]} | {tokens:.1f} | {s1['psnr']:.2f} dB | {' | '.join(cells)} |")
    speed_rows = ["| batch | " + " | ".join(names[k] for k in speed) + " |", "|---|---|---|"]
    for b in args.batches:
        speed_rows.append(f"| {b} | " + " | ".join(f"{speed[k][b]:.2f}" for k in speed) + " |")
    dq1 = metrics["dq"]["stage1_heldout"]
    source = (
        f"Quality numbers: the last full run (`python benchmarks/dq_digits.py`), read from "
        f"{work}/{{rq,dq}}.json; speed measured by this command.\n\n"
        if args.speed_only
        else ""
    )
    body = source + (
        f"Digits demo budget for both (150 VAE + 400 transformer steps, batch 32, width 128, "
        f"6 layers), {args.per_class} samples per class, one seed. Classifier held-out accuracy "
        f"{metrics['rq']['classifier_heldout_accuracy']:.1%}. DQ fine fraction on held-out "
        f"digits {dq1.get('fine_fraction', float('nan')):.3f} (entropy router, r = 0.5).\n\n"
        + "\n".join(rows)
        + "\n\nSampling speed, images/s (codes only, KV cache, fp32, "
        f"{torch.get_num_threads()} threads):\n\n" + "\n".join(speed_rows) + "\n"
    )
    print(write_results("dq_digits", body, {"metrics": metrics, "speed": speed}))


if __name__ == "__main__":
    main()
