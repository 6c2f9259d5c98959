"""What `--compile` gives the cached sampler on this machine: images/s of the eager KV-cached
sampler against the compiled fixed-shape one, batch 1 / 16 / 64 / 256, fp32, same codes.

The model is sampling_speed.py's RQ-Transformer (width 256, 8 heads, K 512, 8×8×4 codes)
at its 10+2 and 8+4 splits. Compilation time (first batch of each size) is reported apart.

    python benchmarks/compile_speed.py     # -> results/compile_speed.md, and its table into
                                           #    results/sampling_speed.md
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402
from sampling_speed import build  # noqa: E402

from rqgen.stage2.sampling import SamplingConfig, sample_codes  # noqa: E402

BATCHES = (1, 16, 64, 256)


def timed(m, batch: int, compile: bool, reps: int) -> tuple[float, float, torch.Tensor]:
    """(first call seconds, best of `reps` later calls, codes of the last call)."""
    cond = torch.arange(batch) % 10
    cfg = SamplingConfig(compile=compile)
    t = time.perf_counter()
    sample_codes(m, cond, cfg, torch.Generator().manual_seed(0))
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        codes = sample_codes(m, cond, cfg, torch.Generator().manual_seed(0))
        best = min(best, time.perf_counter() - t)
    return first, best, codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = p.parse_args()
    rows, data = [], []
    for spatial, depth in ((10, 2), (8, 4)):
        m = build(spatial, depth)
        for batch in args.batches:
            reps = 3 if batch <= 16 else 1
            _, eager, a = timed(m, batch, False, reps)
            first, compiled, b = timed(m, batch, True, reps)
            r = {"split": f"{spatial}+{depth}", "batch": batch,
                 "eager_images_per_s": batch / eager, "compiled_images_per_s": batch / compiled,
                 "speedup": eager / compiled, "compile_s": first - compiled,
                 "same_images": float((a == b).flatten(1).all(1).float().mean())}  # fmt: skip
            data.append(r)
            print(r, flush=True)
            rows.append(
                f"| {r['split']} | {batch} | {r['eager_images_per_s']:.2f} | "
                f"{r['compiled_images_per_s']:.2f} | {r['speedup']:.2f}× | "
                f"{r['compile_s']:.0f} | {r['same_images']:.0%} |"
            )
    table = (
        f"Random-weight class-conditional RQ-Transformers (width 256, 8 heads, K 512, 8×8×4), "
        f"fp32, {torch.get_num_threads()} torch threads, wall time: images/s of `sample_codes` "
        "(codes only), best of 3 batches at batch ≤ 16, 1 above. `compile` = the fixed-shape "
        "steps over static KV caches under torch.compile (inductor, default mode on CPU; "
        "reduce-overhead with CUDA graphs on GPU); compile s = the first call's extra time; "
        "identical code maps = the share of samples whose 256 codes equal the eager "
        "sampler's for the same seed (reassociated float sums can move a draw across a "
        "CDF boundary, and every later code of that sample then differs).\n\n"
        "| split | batch | eager img/s | compiled img/s | speed-up | compile s | "
        "identical code maps |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    md = write_results("compile_speed", "# Compiled sampling on CPU\n\n" + table, {"rows": data})
    # the same table as a section of sampling_speed.md (replaced on every run)
    speed = RESULTS / "sampling_speed.md"
    if speed.is_file():
        text = re.sub(r"\n## torch.compile\n.*", "", speed.read_text(), flags=re.S).rstrip()
        speed.write_text(text + "\n\n## torch.compile\n\nFrom `python benchmarks/compile_speed.py`"
                         " (machine and date in compile_speed.md).\n\n" + table)  # fmt: skip
    print(md.read_text())


if __name__ == "__main__":
    main()
