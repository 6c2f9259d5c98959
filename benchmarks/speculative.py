"""Speculative Jacobi decoding (`--speculative N`) against plain KV-cached sampling.

Speed: sequential passes per image and sampling throughput (class-conditional code maps, no
decoding, temperature 1, no top-k) at batch 1 / 16 / 256, for the bundled digits model and a
random-weight width-512 8+4 model (K 2048, 8×8×4 codes: official_speed.md's larger
configuration), timed as process CPU seconds with 1 thread (robust to a busy machine; the
median of --repeats runs after a warm-up, one run at batch 256).
Quality: the bundled digits model sampled plain and with N = 8 under the same seeds, scored by
the digit classifier trained on the real train split (accuracy against the requested class,
Fréchet distance of its features to the held-out digits), with 95% intervals over seeds
and the paired difference.

    python benchmarks/speculative.py --repeats 3 --seeds 0 1 2 3 4

Results: benchmarks/results/speculative.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interval, write_results  # noqa: E402

from rqgen.data import BundledDigits  # noqa: E402
from rqgen.evaluate.digits import score_digits, train_digit_classifier  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage2.guidance import SamplingConfig  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig  # noqa: E402
from rqgen.stage2.sampling import sample_codes  # noqa: E402
from rqgen.stage2.speculative import SpeculativeStats, sample_codes_speculative  # noqa: E402


def random_w512() -> RQTransformer:
    torch.manual_seed(0)
    config = RQTransformerConfig(codebook_size=2048, code_shape=[8, 8, 4], embed_dim=64,
                                 width=512, heads=8, spatial_layers=8, depth_layers=4,
                                 num_classes=10, dropout=0.0)  # fmt: skip
    return RQTransformer(config, torch.randn(1, 2048, 64)).eval()


def draw(model, cond, n_draft: int, seed: int) -> tuple[torch.Tensor, SpeculativeStats]:
    g = torch.Generator().manual_seed(seed)
    if n_draft == 0:
        c = model.config
        return sample_codes(model, cond, SamplingConfig(), g), SpeculativeStats(c.T, c.T * c.D)
    return sample_codes_speculative(model, cond, SamplingConfig(speculative=n_draft), g)


def speed(model, batch: int, n_draft: int, repeats: int) -> dict:
    cond = torch.arange(batch) % 10
    runs = 1 if batch >= 256 else repeats
    if batch < 256:
        draw(model, cond, n_draft, 99)  # warm-up
    secs, passes = [], []
    for r in range(runs):
        t0 = time.process_time()
        _, stats = draw(model, cond, n_draft, r)
        secs.append(time.process_time() - t0)
        passes.append((stats.spatial_passes, stats.depth_passes))
    s = statistics.median(secs)
    return {"batch": batch, "speculative": n_draft, "cpu_seconds": s, "runs": secs,
            "images_per_cpu_second": batch / s,
            "spatial_passes": statistics.mean(p[0] for p in passes),
            "depth_passes": statistics.mean(p[1] for p in passes)}  # fmt: skip


def quality(model, vae, seeds: list[int], per_class: int, n_draft: int) -> list[dict]:
    classifier, _ = train_digit_classifier()
    val = BundledDigits(32, "val")
    real = torch.stack([val[i][0] for i in range(len(val))])
    cond = torch.arange(10).repeat_interleave(per_class)
    out = []
    for seed in seeds:
        for n in (0, n_draft):
            codes, _ = draw(model, cond, n, seed)
            with torch.no_grad():
                images = vae.decode_codes(codes).clamp(-1, 1)
            s = score_digits(classifier, images, cond, real)
            out.append({"seed": seed, "speculative": n, **s})
            print(out[-1], flush=True)
    return out


def cell(values: list[float], digits: int = 3) -> str:
    m, h = interval(values)
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--drafts", default="4,8,16", help="values of N to time")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--random-batch-limit", type=int, default=16,
                   help="the random model's largest batch timed speculatively")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    pipe = RQPipeline.from_pretrained("bundled:digits", device="cpu", dtype="fp32")
    digits = "digits demo (w128, 4+2, K 512)"
    models = {digits: pipe.model.eval(), "random w512 8+4, K 2048": random_w512()}
    rows = ["| model | batch | N | spatial passes | depth passes "
            "| images per CPU-second | vs plain |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    timings = []
    for name, model in models.items():
        for batch in map(int, args.batches.split(",")):
            base = None
            for n in [0, *map(int, args.drafts.split(","))]:
                if n and name != digits and batch > args.random_batch_limit:
                    continue  # N× the work of a compute-bound step: far slower, and long to time
                r = {"model": name, **speed(model, batch, n, args.repeats)}
                timings.append(r)
                print(r, flush=True)
                base = base or r["images_per_cpu_second"]
                rows.append(f"| {name} | {batch} | {n or 'plain'} | {r['spatial_passes']:.1f} "
                            f"| {r['depth_passes']:.1f} | {r['images_per_cpu_second']:.2f} "
                            f"| {r['images_per_cpu_second'] / base:.2f}× |")  # fmt: skip
    n_q = 8
    scores = quality(models[digits], pipe.vae, args.seeds,
                     args.per_class, n_q)  # fmt: skip
    by = {(s["seed"], s["speculative"]): s for s in scores}
    qrows = ["| sampler | classifier accuracy | Fréchet distance |", "|---|---|---|"]
    for n in (0, n_q):
        acc = [by[s, n]["accuracy"] for s in args.seeds]
        fd = [by[s, n]["frechet_distance"] for s in args.seeds]
        qrows.append(
            f"| {'plain' if n == 0 else f'speculative N={n}'} | {cell(acc)} | {cell(fd, 2)} |"
        )
    d_acc = [by[s, n_q]["accuracy"] - by[s, 0]["accuracy"] for s in args.seeds]
    d_fd = [by[s, n_q]["frechet_distance"] - by[s, 0]["frechet_distance"] for s in args.seeds]
    body = "\n".join([
        "Speed: class-conditional code maps (classes cycled), temperature 1, no top-k, no "
        "decoding; process CPU seconds with 1 thread, median of "
        f"{args.repeats} runs after a warm-up (one run at batch 256). Passes: the sequential "
        "network calls per batch, each serving the whole batch, the mean over runs (plain "
        "sampling: T = 64 spatial and T·D = 256 depth calls). Load average at the start: "
        f"{load:.2f} (2 cores).",
        "",
        *rows,
        "",
        f"Quality on the digits demo model: {10 * args.per_class} samples per seed "
        f"({args.per_class} per class), seeds {', '.join(map(str, args.seeds))}, the same seed "
        "for both samplers (different uniforms, so different images); means ± half-width of "
        "the 95% Student-t interval over seeds.",
        "",
        *qrows,
        "",
        f"Speculative − plain (same seed): accuracy {cell(d_acc)}, Fréchet distance "
        f"{cell(d_fd, 2)}.",
    ])  # fmt: skip
    write_results("speculative", body, {"timings": timings, "quality": scores})


if __name__ == "__main__":
    main()
