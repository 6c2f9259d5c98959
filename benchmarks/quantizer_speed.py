"""Our ResidualQuantizer against vector-quantize-pytorch's ResidualVQ on this CPU.

Same dim, K, D, one shared codebook, EMA (decay 0.99), dead-code restarts, data-dependent
init, training mode (search + codebook update). Measures time per forward+update and the
quantization error on held-out vectors after the same number of updates on the same stream.
(Peak memory is not measured: RSS growth of one forward read 0, as freed pages are reused.)

    python benchmarks/quantizer_speed.py            # full table -> results/quantizer_speed.md
    python benchmarks/quantizer_speed.py --quick --json
    python benchmarks/quantizer_speed.py --init-study   # -> results/quantizer_init.md
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

from rqgen import ResidualQuantizer  # noqa: E402


def make_stream(dim: int, n: int, steps: int, seed: int = 0):
    """A mixture of 2048 anisotropic Gaussians: structured like encoder features."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(2048, dim, generator=g)
    scales = torch.rand(2048, 1, generator=g) * 0.5 + 0.1

    def draw(m):
        k = torch.randint(2048, (m,), generator=g)
        return centers[k] + scales[k] * torch.randn(m, dim, generator=g)

    return [draw(n) for _ in range(steps)], draw(n)


def build(impl: str, dim: int, K: int, D: int):
    if impl == "ours":
        q = ResidualQuantizer(dim, K, D, shared_codebook=True, decay=0.99)
        return q, lambda x: q(x)
    from vector_quantize_pytorch import ResidualVQ

    q = ResidualVQ(
        dim=dim, num_quantizers=D, codebook_size=K, shared_codebook=True, decay=0.99,
        kmeans_init=True, kmeans_iters=1, threshold_ema_dead_code=1,
    )  # fmt: skip
    return q, lambda x: q(x[None])  # ResidualVQ wants (batch, seq, dim)


def quant_error(impl: str, q, x: torch.Tensor) -> float:
    q.eval()
    with torch.no_grad():
        out = q(x) if impl == "ours" else q(x[None])
        xq = out.quantized if impl == "ours" else out[0][0]
    q.train()
    return float((xq - x).pow(2).mean() / x.pow(2).mean())  # relative MSE


def run(impl: str, dim: int, K: int, D: int, n: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    q, step = build(impl, dim, K, D)
    q.train()
    stream, held_out = make_stream(dim, n, steps)
    for x in stream:  # the same updates for both
        step(x)
    err = quant_error(impl, q, held_out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(stream[0])
        times.append(time.perf_counter() - t)
    return {"ms": 1000 * sorted(times)[len(times) // 2], "rel_mse": err}


def _lloyd(q: ResidualQuantizer, pool: torch.Tensor, iters: int) -> None:
    """Lloyd iterations of the shared codebook on `pool` (empty clusters keep their code)."""
    cb = q.codebook[0]
    for _ in range(iters):
        k = q._search(pool, 0, None, None)
        sums = torch.zeros_like(cb).index_add_(0, k, pool)
        counts = torch.bincount(k, minlength=q.codebook_size).float()
        live = counts > 0
        cb[live] = sums[live] / counts[live, None]
    q.embed_sum[0], q.cluster_size[0] = cb, 1.0


def _pool(q: ResidualQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The residuals r_0..r_{D-1} of x under q's codebook, all depths in one pool."""
    return q._residual_quantize(x)[2].transpose(0, 1).reshape(-1, q.dim)


def init_study(dim=64, K=512, D=4, n=16384, steps=100) -> None:
    """#16 item 3: does a k-means initialisation (of depth-0 vectors, or of the residuals of
    every depth) beat the data init? Relative MSE on held-out vectors along the updates."""
    stream, held = make_stream(dim, n, steps)
    at = (1, 10, 25, 50, 100)
    variants = {
        "data": "K random vectors of the first batch (rqgen's init)",
        "kmeans1": "+ 1 Lloyd iteration on the first batch",
        "kmeans5": "+ 5 Lloyd iterations on the first batch",
        "pooled1": "K random residuals of every depth, + 1 Lloyd iteration on that pool",
        "pooled5": "K random residuals of every depth, + 5 Lloyd iterations on that pool",
    }
    rows = ["| init | how | " + " | ".join(f"after {a}" for a in at) + " |",
            "|---|---|" + "---|" * len(at)]  # fmt: skip
    data = {}
    for name, how in variants.items():
        torch.manual_seed(0)
        q = ResidualQuantizer(dim, K, D, shared_codebook=True, decay=0.99).train()
        q._init_codebook(stream[0])
        iters = int(name[-1]) if name != "data" else 0
        if name.startswith("kmeans"):
            _lloyd(q, stream[0], iters)
        elif name.startswith("pooled"):
            q.codebook[0] = _pool(q, stream[0])[torch.randperm(n * D)[:K]]
            for _ in range(iters):
                _lloyd(q, _pool(q, stream[0]), 1)
        curve = {}
        for i, x in enumerate(stream, 1):
            q(x)
            if i in at:
                curve[i] = quant_error("ours", q, held)
        data[name] = curve
        rows.append(f"| {name} | {how} | " + " | ".join(f"{curve[a]:.4f}" for a in at) + " |")
        print(rows[-1], flush=True)
    body = (
        f"rqgen ResidualQuantizer (dim {dim}, K {K}, D {D}, shared codebook, decay 0.99 per "
        f"depth, restarts below 1), {n} vectors per update from the Gaussian mixture of "
        "quantizer_speed; relative MSE ||x - Ẑ||² / ||x||² on held-out vectors after N "
        "updates. One seed.\n\n" + "\n".join(rows)
    )
    print(write_results("quantizer_init", body, {"curves": data}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one setting, fewer updates (< 1 min)")
    p.add_argument("--json", action="store_true", help="print one JSON object (quick setting)")
    p.add_argument("--settings", type=int, default=3, help="run only the first N settings")
    p.add_argument("--init-study", action="store_true", help="k-means vs data init (#16)")
    args = p.parse_args()
    if args.init_study:
        init_study()
        return

    quick = dict(dim=64, K=512, D=4, n=16384)
    if args.quick or args.json:
        ours = run("ours", **quick, steps=20, repeats=5)
        vqp = run("vqp", **quick, steps=20, repeats=5)
        res = {"ours_ms": ours["ms"], "vqp_ms": vqp["ms"], "ours_mse": ours["rel_mse"],
               "vqp_mse": vqp["rel_mse"], "setting": quick, "updates": 20,
               "threads": torch.get_num_threads()}  # fmt: skip
        print(json.dumps(res) if args.json else res)
        return

    settings = [
        dict(dim=64, K=512, D=4, n=16384),  # tiny32 stage 1: batch 64 of 8×8 (×4 depths)
        dict(dim=64, K=512, D=8, n=16384),
        dict(dim=256, K=16384, D=4, n=4096),  # the paper's codebook, batch 64 of 8×8
    ]
    rows = [
        "| dim | K | D | vectors | ours ms | vqp ms | speed-up | ours rel. MSE | vqp rel. MSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    data = []
    for s in settings[: args.settings]:
        steps, repeats = (100, 5) if s["K"] <= 512 else (10, 3)
        ours = run("ours", **s, steps=steps, repeats=repeats)
        vqp = run("vqp", **s, steps=steps, repeats=repeats)
        data.append({**s, "updates": steps, "ours": ours, "vqp": vqp})
        rows.append(
            f"| {s['dim']} | {s['K']} | {s['D']} | {s['n']} | {ours['ms']:.1f} | {vqp['ms']:.1f} "
            f"| {vqp['ms'] / ours['ms']:.1f}× | {ours['rel_mse']:.4f} | {vqp['rel_mse']:.4f} |"
        )
        print(rows[-1], flush=True)
    from importlib.metadata import version

    body = (
        f"vector-quantize-pytorch {version('vector-quantize-pytorch')} ResidualVQ "
        "(shared_codebook, decay 0.99, kmeans_init with 1 iteration, threshold_ema_dead_code 1) "
        "vs rqgen ResidualQuantizer (shared, decay 0.99 per depth as in the official code and "
        "ResidualVQ, i.e. one pooled update of 0.99^D per step; data init, restarts below 1). "
        "Training-mode forward incl. the EMA update, median of 5 (3 for K = 16384); relative "
        "MSE = ||x - Ẑ||² / ||x||² on held-out vectors of the same Gaussian mixture after "
        "100 updates (10 for K = 16384).\n\n" + "\n".join(rows)
    )
    print(write_results("quantizer_speed", body, {"settings": data}))


if __name__ == "__main__":
    main()
