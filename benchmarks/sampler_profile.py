"""Where the cached sampler's time goes, against its matrix-product floor.

For the two configurations of official_speed.md (random weights, 8×8×4 codes, 10 classes,
fp32, 1 thread, class-conditional, temperature 1), at each batch size: images per CPU-second
of `sample_codes`, of its matrix products alone (official_speed.matmul_floor) and their
ratio; then one profiled run split by what each operator is: products (addmm, mm, bmm),
attention over the KV cache (scaled_dot_product_attention), GELU, copies (copy_: cache
writes, bias broadcasts, repeats), other tensor operators (norms, adds, the draw) and what
no operator accounts for (Python, dispatch). The speeds are of runs without the profiler;
the operators' shares come from one profiled run, `unaccounted` from the unprofiled time.

    python benchmarks/sampler_profile.py [--batches 1,16,64,256] [--repeats 3]

Results: benchmarks/results/sampler_profile.md. It is what the floor-gap work starts from:
the share of each kind of work says which one a faster sampler must shrink.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import write_results
from official_speed import CONFIGS, matmul_floor, timed
from torch.profiler import profile

from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig
from rqgen.stage2.sampling import SamplingConfig, sample_codes

KINDS = {  # operator name -> kind (first match on a substring)
    "addmm": "products",
    "aten::mm": "products",
    "bmm": "products",
    "scaled_dot_product": "attention",
    "gelu": "GELU",
    "copy_": "copies",
}
ORDER = ["products", "attention", "GELU", "copies", "other operators", "unaccounted"]


def model_for(config: str) -> RQTransformer:
    width, heads, spatial, depth, k = CONFIGS[config]
    torch.manual_seed(0)
    c = RQTransformerConfig(codebook_size=k, width=width, heads=heads, spatial_layers=spatial,
                            depth_layers=depth, dropout=0.0, num_classes=10)  # fmt: skip
    return RQTransformer(c, torch.randn(1, k, 64)).eval()


def split(run, seconds: float) -> dict[str, float]:
    """Seconds by kind of work: operators' self CPU time in one profiled run, and as
    `unaccounted` what the unprofiled run took beyond them (`seconds`), so the profiler's
    own per-call cost does not count as Python."""
    with profile() as p:
        run(99)
    out = dict.fromkeys(ORDER, 0.0)
    for e in p.key_averages():
        kind = next((v for k, v in KINDS.items() if k in e.key), "other operators")
        out[kind] += e.self_cpu_time_total / 1e6
    out["unaccounted"] = max(seconds - sum(out.values()), 0.0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    torch.set_grad_enabled(False)
    load = os.getloadavg()[0]
    rows = []
    for config in args.configs.split(","):
        model = model_for(config)
        for batch in map(int, args.batches.split(",")):

            def run(r, b=batch, model=model):
                gen = torch.Generator().manual_seed(100 + r)
                sample_codes(model, torch.randint(0, 10, (b,), generator=gen),
                             SamplingConfig(), gen)  # fmt: skip

            floor, _ = matmul_floor(model, batch)
            ours = timed(run, args.repeats, 1)["seconds"]
            low = timed(floor, args.repeats, 1)["seconds"]
            parts = split(run, ours)
            total = sum(parts.values())
            row = {"config": config, "batch": batch, "rqgen": batch / ours,
                   "floor": batch / low, "ratio": low / ours,
                   "split": {k: v / total for k, v in parts.items()}}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    head = "| config | batch | rqgen img/s | floor img/s | rqgen / floor | " + " | ".join(ORDER)
    lines = [
        f"Process CPU time, 1 thread; load average {load:.2f} at the start; median of "
        f"{args.repeats} runs after a warm-up. The split (share of one profiled run) is by "
        "operators' self time (under the profiler, which inflates small operators); "
        "`unaccounted` is the unprofiled run's time beyond them: Python and dispatch.",
        "",
        head + " |",
        "|" + "---|" * (5 + len(ORDER)),
    ]
    for r in rows:
        shares = " | ".join(f"{100 * r['split'][k]:.0f}%" for k in ORDER)
        lines.append(f"| {r['config']} | {r['batch']} | {r['rqgen']:.2f} | {r['floor']:.2f} | "
                     f"{r['ratio']:.2f} | {shares} |")  # fmt: skip
    print(write_results("sampler_profile", "\n".join(lines), {"rows": rows, "load": load}))


if __name__ == "__main__":
    main()
