"""Sampling speed (the paper's Fig. 4 analog): RQ-Transformer on 8×8×4 against the flat
transformer on 16×16×1, at equal width and equal total layers, on this machine.

Both are the same `RQTransformer` class: the flat model has every layer spatial and no
depth transformer. Random weights suffice: speed does not depend on them.

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


def build(kind: str) -> RQTransformer:
    torch.manual_seed(0)
    if kind == "rq":
        shape, spatial, depth = [8, 8, 4], 8, 4
    else:
        shape, spatial, depth = [16, 16, 1], LAYERS, 0
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
    cond = torch.arange(batch) % 10
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with ctx:
        sample_codes(m, cond[: min(batch, 2)], SamplingConfig(), use_cache=cache)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            sample_codes(m, cond, SamplingConfig(), torch.Generator().manual_seed(0), cache)
    return batch * reps / (time.perf_counter() - t)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--batches", default="1,16,64,256")
    args = p.parse_args()
    rq, flat = build("rq"), build("flat")
    n_rq, n_flat = (sum(x.numel() for x in m.parameters()) for m in (rq, flat))
    if args.quick or args.json:
        res = {"rq_images_per_s": images_per_s(rq, 64, True, False),
               "flat_images_per_s": images_per_s(flat, 64, True, False),
               "params_rq": n_rq, "params_flat": n_flat, "batch": 64, "kv_cache": True,
               "dtype": "fp32", "threads": torch.get_num_threads()}  # fmt: skip
        print(json.dumps(res) if args.json else res)
        return

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    flops = {"rq": sampler_flops(rq), "flat": sampler_flops(flat)}
    rows = [
        "| batch | cache | dtype | RQ img/s | flat img/s | RQ/flat | RQ % of peak "
        "| flat % of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    data = []
    for batch in map(int, args.batches.split(",")):
        for cache in (True, False):
            if not cache and batch > 16:
                continue  # uncached costs T·D full forwards: minutes per batch here
            for dtype in ("fp32", "bf16"):
                if dtype == "bf16" and (batch > 16 or not cache):
                    continue  # CPUs without bf16 matmul units emulate it: ~10× slower than fp32
                r = images_per_s(rq, batch, cache, dtype == "bf16")
                f = images_per_s(flat, batch, cache, dtype == "bf16")
                pr = 100 * r * flops["rq"] / peak[dtype] if cache else float("nan")
                pf = 100 * f * flops["flat"] / peak[dtype] if cache else float("nan")
                data.append({"batch": batch, "cache": cache, "dtype": dtype, "rq": r, "flat": f})
                rows.append(f"| {batch} | {'yes' if cache else 'no'} | {dtype} | {r:.2f} | "
                            f"{f:.2f} | {r / f:.1f}× | {pr:.1f} | {pf:.1f} |")  # fmt: skip
                print(rows[-1], flush=True)
    share = {k: matmul_share(m) for k, m in (("rq", rq), ("flat", flat))}
    body = (
        f"Random-weight class-conditional models, width {WIDTH}, {HEADS} heads, K = {K}: "
        f"RQ-Transformer 8 spatial + 4 depth layers on 8×8×4 ({n_rq / 1e6:.1f}M params); flat "
        f"transformer {LAYERS} layers on 16×16×1 ({n_flat / 1e6:.1f}M params). Images/s of "
        "`sample_codes` (codes only; decoding excluded). Measured matmul peak: "
        f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
        f"analytic FLOPs per cached sample: RQ {flops['rq'] / 1e9:.2f} G, flat "
        f"{flops['flat'] / 1e9:.2f} G. Uncached runs only at batch ≤ 16 and bf16 only at batch "
        "≤ 16 (this CPU has no bf16 matmul units: autocast to bf16 is slower than fp32 here; "
        "the option is for GPUs).\n\n" + "\n".join(rows) + "\n\nWhere the cached sampler "
        "spends its time at batch 64, fp32 (torch profiler, self CPU time): "
        + "; ".join(
            f"{k}: {v['matmul']:.0%} in matmul and attention kernels, "
            f"{v['other_ops']:.0%} in other ops, {v['python']:.0%} outside ops "
            "(Python, dispatch)"
            for k, v in share.items()
        )  # fmt: skip
        + ".\n"
    )
    data_all = {"peak": peak, "flops": flops, "rows": data, "time_share_batch64": share}
    print(write_results("sampling_speed", body, data_all))


if __name__ == "__main__":
    main()
