"""int8 sampling on CPU (`--dtype int8`) against fp32: speed at batch 1 / 16 / 64 and the
logit error.

Models: the bundled digits model and a random-weight width-512 8+4 model (K 2048, 8×8×4
codes: official_speed.md's larger configuration). Plain KV-cached sampling of class-
conditional code maps (no decoding, temperature 1, no top-k), timed as process CPU seconds
with 1 thread (robust to a busy machine), the median of --repeats runs after a warm-up.
Logit error: teacher-forced logits of 8 random code maps, fp32 vs int8: the largest error
over the logits' standard deviation, and the total variation between the next-code
distributions (mean and max over codes).

    python benchmarks/int8.py --repeats 3

Results: benchmarks/results/int8.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from speculative import random_w512  # noqa: E402

from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402
from rqgen.stage2.int8 import quantize_int8  # noqa: E402
from rqgen.stage2.sampling import sample_codes  # noqa: E402


def cpu_seconds(model, batch: int, repeats: int) -> float:
    cond = torch.arange(batch) % 10
    sample_codes(model, cond, SamplingConfig(), torch.Generator().manual_seed(99))
    secs = []
    for r in range(repeats):
        t0 = time.process_time()
        sample_codes(model, cond, SamplingConfig(), torch.Generator().manual_seed(r))
        secs.append(time.process_time() - t0)
    return statistics.median(secs)


@torch.no_grad()
def logit_error(fp32, int8) -> dict:
    c = fp32.config
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(c.codebook_size, (8, c.T, c.D), generator=g)
    cond = torch.arange(8) % max(c.num_classes, 1)
    ref, _ = fp32(codes, cond)
    low, _ = int8(codes, cond)
    tv = 0.5 * (low.softmax(-1) - ref.softmax(-1)).abs().sum(-1)
    return {"max_error_over_std": float((low - ref).abs().max() / ref.std()),
            "tv_mean": float(tv.mean()), "tv_max": float(tv.max())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,16,64")
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    digits = RQPipeline.from_pretrained("bundled:digits", device="cpu", dtype="fp32").model
    models = {
        "digits demo (w128, 4+2, K 512)": digits.eval(),
        "random w512 8+4, K 2048": random_w512(),
    }
    rows = ["| model | batch | fp32 images / CPU-s | int8 images / CPU-s | int8 / fp32 |",
            "|---|---|---|---|---|"]  # fmt: skip
    errs, runs = (
        ["| model | max logit error / logit std | TV mean | TV max |", "|---|---|---|---|"],
        [],
    )
    for name, fp32 in models.items():
        int8 = quantize_int8(copy.deepcopy(fp32))
        e = logit_error(fp32, int8)
        errs.append(
            f"| {name} | {e['max_error_over_std']:.3f} | {e['tv_mean']:.4f} | {e['tv_max']:.4f} |"
        )
        for batch in map(int, args.batches.split(",")):
            a, b = cpu_seconds(fp32, batch, args.repeats), cpu_seconds(int8, batch, args.repeats)
            runs.append({"model": name, "batch": batch, "fp32_s": a, "int8_s": b, **e})
            print(runs[-1], flush=True)
            rows.append(f"| {name} | {batch} | {batch / a:.2f} | {batch / b:.2f} | {a / b:.2f}× |")
    body = "\n".join([
        "Plain KV-cached sampling, class-conditional code maps, temperature 1, no top-k, no "
        f"decoding; process CPU seconds, 1 thread, median of {args.repeats} runs after a "
        f"warm-up. Load average at the start: {load:.2f} (2 cores).",
        "",
        *rows,
        "",
        "Logit error of int8 against fp32 (teacher-forced, 8 random code maps):",
        "",
        *errs,
    ])  # fmt: skip
    write_results("int8", body, {"runs": runs})


if __name__ == "__main__":
    main()
