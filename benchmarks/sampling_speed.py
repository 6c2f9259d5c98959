"""Sampling speed (the paper's Fig. 4 analog): RQ-Transformer on 8×8×4 against the flat
transformer on 16×16×1, at equal width and equal total layers (12), on this machine.

All models are the same `RQTransformer` class: the flat model has every layer spatial and
no depth transformer. The RQ-Transformer is measured at three splits of its 12 layers into
spatial + depth: 10+2 (the paper's 1.4B model, 42+6, has this 7:1 ratio), 9+3 (its 480M
model, 12+4) and 8+4. Random weights suffice: speed does not depend on them.

    python benchmarks/sampling_speed.py                 # table -> results/sampling_speed.md
    python benchmarks/sampling_speed.py --quick --json  # the batch-64 row as one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig  # noqa: E402
from rqgen.stage2.sampling import SamplingConfig, sample_codes  # noqa: E402

WIDTH, HEADS, LAYERS, K = 256, 8, 12, 512


SPLITS = ((10, 2), (9, 3), (8, 4))  # RQ spatial + depth layers; the first is the headline


def build(spatial: int, depth: int) -> RQTransformer:
    """depth = 0: the flat transformer on 16×16×1; otherwise RQ on 8×8×4."""
    torch.manual_seed(0)
    shape = [16, 16, 1] if depth == 0 else [8, 8, 4]
    cfg = RQTransformerConfig(
        codebook_size=K, code_shape=shape, embed_dim=64, width=WIDTH, heads=HEADS,
        spatial_layers=spatial, depth_layers=depth, dropout=0.0, num_classes=10,
    )  # fmt: skip
    return RQTransformer(cfg, torch.randn(1, K, 64)).eval()


def sampler_flops(m: RQTransformer) -> float:
    """FLOPs of one cached sample: 2·(weights touched) per token per layer + attention."""
    c = m.config
    per_token_layer = 2 * 12 * c.width**2  # qkv + proj (4C²) + MLP (8C²), ×2 for mul-add
    L = c.cond_length + c.T - 1
    spatial = c.spatial_layers * sum(per_token_layer + 4 * c.width * (i + 1) for i in range(L))
    depth = c.T * c.depth_layers * sum(per_token_layer + 4 * c.width * (d + 1) for d in range(c.D))
    head = c.T * c.D * 2 * c.width * c.codebook_size
    return float(spatial + depth + head)


def matmul_peak(dtype) -> float:
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def images_per_s(m, batch: int, cache: bool, bf16: bool, reps: int = 1) -> float:
    """Best of `reps` timed batches (after a small warm-up)."""
    cond = torch.arange(batch) % 10
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        sample_codes(m, cond[: min(batch, 2)], SamplingConfig(), use_cache=cache)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            sample_codes(m, cond, SamplingConfig(), torch.Generator().manual_seed(0), cache)
            best = min(best, time.perf_counter() - t)
    return batch / best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")


def matmul_share(m: RQTransformer, batch: int = 64) -> dict[str, float]:
    """Fractions of the wall time of one cached batch spent in matmul/attention kernels, in
    other aten ops, and outside any op (Python and dispatch overhead)."""
    cond = torch.arange(batch) % 10
    sample_codes(m, cond[:2], SamplingConfig())
    t = time.perf_counter()
    with torch.profiler.profile() as prof:
        sample_codes(m, cond, SamplingConfig(), torch.Generator().manual_seed(0))
    wall = (time.perf_counter() - t) * 1e6
    # top-level aten ops only: their self times add up without double counting
    ev = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    mm = sum(e.self_cpu_time_total for e in ev if e.key.startswith(MATMUL_OPS))
    other = sum(e.self_cpu_time_total for e in ev) - mm
    return {
        "matmul": mm / wall,
        "other_ops": other / wall,
        "python": max(0.0, 1 - (mm + other) / wall),
    }


def n_params(m: torch.nn.Module) -> int:
    return sum(x.numel() for x in m.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--reps", type=int, default=2, help="timed batches per cell (best kept)")
    args = p.parse_args()
    flat = build(LAYERS, 0)
    rqs = {f"{s}+{d}": build(s, d) for s, d in SPLITS}
    main_rq = next(iter(rqs))
    if args.quick or args.json:
        rq = rqs[main_rq]
        res = {"rq_images_per_s": images_per_s(rq, 64, True, False),
               "flat_images_per_s": images_per_s(flat, 64, True, False),
               "params_rq": n_params(rq), "params_flat": n_params(flat), "rq_layers": main_rq,
               "flat_layers": LAYERS, "batch": 64, "kv_cache": True, "dtype": "fp32",
               "threads": torch.get_num_threads()}  # fmt: skip
        print(json.dumps(res) if args.json else res)
        return

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops = {"flat": sampler_flops(flat), **{k: sampler_flops(m) for k, m in rqs.items()}}
    cols = " | ".join(f"RQ {k} img/s (×flat)" for k in rqs)
    rows = [
        f"| batch | cache | dtype | flat {LAYERS} img/s | {cols} | flat % of fp32 peak "
        f"| RQ {main_rq} % of fp32 peak |",
        "|---|---|---|---|" + "---|" * len(rqs) + "---|---|",
    ]
    data = []
    for batch in map(int, args.batches.split(",")):
        for cache in (True, False):
            if not cache and batch > 16:
                continue  # uncached costs T·D full forwards: minutes per batch here
            for dtype in ("fp32", "bf16"):
                if dtype == "bf16" and (batch > 16 or not cache):
                    continue  # this CPU emulates bf16 matmuls: ~10× slower than fp32
                bf16 = dtype == "bf16"
                reps = 1 if not cache or bf16 else args.reps
                f = images_per_s(flat, batch, cache, bf16, reps)
                r = {k: images_per_s(m, batch, cache, bf16, reps) for k, m in rqs.items()}
                # against the fp32 peak for every row: this CPU's bf16 matmul is emulated, so
                # its own "peak" is lower than what the sampler's small bf16 ops reach
                pf = 100 * f * flops["flat"] / peak["fp32"] if cache else float("nan")
                pr = 100 * r[main_rq] * flops[main_rq] / peak["fp32"] if cache else float("nan")
                data.append({"batch": batch, "cache": cache, "dtype": dtype, "flat": f, **r})
                cells = " | ".join(f"{v:.2f} ({v / f:.1f}×)" for v in r.values())
                pcts = f"{pf:.1f} | {pr:.1f}" if cache else "– | –"
                rows.append(f"| {batch} | {'yes' if cache else 'no'} | {dtype} | {f:.2f} | "
                            f"{cells} | {pcts} |")  # fmt: skip
                print(rows[-1], flush=True)
    share = {k: matmul_share(m) for k, m in (("flat", flat), (f"RQ {main_rq}", rqs[main_rq]))}
    sizes = ", ".join(f"RQ {k} {n_params(m) / 1e6:.1f}M" for k, m in rqs.items())
    gflops = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items())
    body = (
        f"Random-weight class-conditional models, width {WIDTH}, {HEADS} heads, K = {K}, "
        f"{LAYERS} layers in all: flat transformer on 16×16×1 ({n_params(flat) / 1e6:.1f}M "
        f"params) and RQ-Transformer on 8×8×4 split spatial+depth ({sizes}). Images/s of "
        "`sample_codes` (codes only; decoding excluded), best of "
        f"{args.reps} batches (1 when uncached or bf16). Measured matmul peak: fp32 "
        f"{peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.2f} GFLOP/s (the % columns "
        "are of the fp32 peak for every row); analytic "
        f"GFLOPs per cached sample: {gflops}. Uncached and bf16 run only at batch ≤ 16 (this "
        "CPU has no bf16 matmul units: bf16 autocast is slower than fp32 here; the option is "
        "for GPUs).\n\n" + "\n".join(rows) + "\n\nWhere the cached sampler spends its "
        "time at batch 64, fp32 (torch profiler; self time of aten ops against wall time): "
        + "; ".join(
            f"{k}: {v['matmul']:.0%} in matmul and attention kernels, "
            f"{v['other_ops']:.0%} in other ops, {v['python']:.0%} outside ops "
            "(Python, dispatch)"
            for k, v in share.items()
        )  # fmt: skip
        + ".\n"
    )
    result = {"peak": peak, "flops": flops, "rows": data, "time_share_batch64": share}
    print(write_results("sampling_speed", body, result))


if __name__ == "__main__":
    main()
