"""One command for a CUDA machine, in two parts, each written to benchmarks/results/gpu.md as
soon as it is done:

1. digits: train both stages briefly on the bundled digits (default precision: bf16 on
   GPUs), then sample in fp32 and bf16, eager and compiled (CUDA graphs): images/s, first
   call (compilation included), peak memory, whether compiled fp32 draws the eager codes,
   and whether torch.compile had to skip CUDA graphs anywhere.
2. paper scale (`--paper-model`, default the paper's 1.4B ImageNet model, 42+6 layers,
   width 1536, 8x8x4 codes, K 16384, random weights): images/s in bf16 against a flat
   transformer of the same width and the same 48 layers on 16x16x1 codes (the paper's
   Fig. 4: RQ 4.1x at batch 100, 5.6x at batch 200, A100), eager and compiled.

    python benchmarks/gpu_check.py                               # ~3.5 minutes on one H100
    python benchmarks/gpu_check.py --budget-s 120 --paper-model none

A configuration that fails is recorded with its one-line error and the rest go on; past
`--budget-s` the remaining rows are skipped (listed as such). Exits with one line where
there is no CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from rqgen.configs import PAPER_MODELS, load_ar_experiment, load_vae_experiment  # noqa: E402
from rqgen.pipeline import RQPipeline  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer  # noqa: E402
from rqgen.stage2.sampling import SamplingConfig, sample_codes  # noqa: E402
from rqgen.train.ar import train_ar  # noqa: E402
from rqgen.train.vae import train_vae  # noqa: E402
from rqgen.utils.device import resolve_precision  # noqa: E402

DEVICE = "cuda"  # a module constant so that the script's logic can be dry-run elsewhere


class Report:
    """Rows of both parts; rewrites gpu.md / gpu.json after every part."""

    def __init__(self, args):
        self.args, self.sections, self.data = args, {}, {}
        self.start = time.perf_counter()

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def add(self, name: str, markdown: str, data) -> None:
        """Set (or replace) part `name`, and rewrite the files with every part so far."""
        self.sections[name], self.data[name] = markdown, data
        body = "# GPU check\n\n" + "\n\n".join(self.sections.values())
        write_results(self.args.name, body, self.data)


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def timed(fn, reps: int) -> tuple[object, float, float, float]:
    """(last result, first call s, best of `reps` later calls s, peak GiB of the later)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return out, first, best, torch.cuda.max_memory_allocated() / 2**30


def guarded(report: Report, row: dict, fn) -> dict:
    """Run one configuration: skipped past the budget, its error kept as one line."""
    if report.left_s() <= 0:
        return {**row, "error": "skipped: over --budget-s"}
    try:
        row.update(fn())
    except Exception as e:  # a GPU path that breaks is the finding, not the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        torch.cuda.empty_cache()
    print({k: v for k, v in row.items() if k != "codes"}, flush=True)
    return row


def digits(report: Report) -> None:
    a = report.args
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp)
        vae_exp = load_vae_experiment("tiny32", [f"train.steps={a.vae_steps}"])
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        vae_dir = train_vae(vae_exp, "bundled:digits", out / "vae", device=DEVICE)
        vae_s, vae_mem = time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30
        ar_exp = load_ar_experiment("ar-tiny", [f"train.steps={a.ar_steps}"])
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        ar_dir = train_ar(ar_exp, vae_dir, "bundled:digits", out / "ar", device=DEVICE)
        ar_s, ar_mem = time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30

        def sample(dtype: str, compile: bool, batch: int):
            pipe = RQPipeline.from_pretrained(ar_dir, device=DEVICE, dtype=dtype)
            model, vae = pipe.model, pipe.vae
            cond = torch.arange(batch, device=DEVICE) % model.config.num_classes
            cfg = SamplingConfig(guidance_scale=2.0, compile=compile)
            skips = cudagraph_skips()
            gen = lambda: torch.Generator(DEVICE).manual_seed(0)  # noqa: E731
            codes, first, best, peak = timed(lambda: sample_codes(model, cond, cfg, gen()), 3)
            images = vae.decode_codes(codes).clamp(-1, 1)
            if not torch.isfinite(images).all():
                raise FloatingPointError(f"{dtype} samples decode to non-finite pixels")
            return {"images_per_s": batch / best, "first_call_s": first, "peak_gib": peak,
                    "cudagraph_skips": cudagraph_skips() - skips, "codes": codes.cpu()}  # fmt: skip

        rows = [guarded(report, {"batch": b, "dtype": d, "compile": c},
                        lambda b=b, d=d, c=c: sample(d, c, b))
                for b in a.batches for d in ("fp32", "bf16") for c in (False, True)]  # fmt: skip
    same = {}
    for r in rows:
        if r["dtype"] == "fp32" and r["compile"] and "codes" in r:
            eager = [e for e in rows if e["batch"] == r["batch"] and e["dtype"] == "fp32"
                     and not e["compile"] and "codes" in e]  # fmt: skip
            if eager:
                same[r["batch"]] = bool(torch.equal(r["codes"], eager[0]["codes"]))
    prec = resolve_precision(vae_exp.train.precision, torch.device(DEVICE))
    md = (
        f"## Digits\n\nTraining (tiny32 RQ-VAE {a.vae_steps} steps, ar-tiny {a.ar_steps} steps, "
        f"bundled digits, precision {prec}): stage 1 {vae_s:.0f} s (peak {vae_mem:.2f} GiB), "
        f"stage 2 {ar_s:.0f} s (peak {ar_mem:.2f} GiB).\n\n"
        "Sampling (codes only, classifier-free guidance 2, best of 3 batches; the first call "
        "includes compilation and CUDA graph capture):\n\n" + table(rows)
        + f"\n\nCompiled fp32 codes equal eager fp32 codes, per batch: {same}\n"
    )  # fmt: skip
    data = {"rows": [{k: v for k, v in r.items() if k != "codes"} for r in rows],
            "train_s": {"vae": vae_s, "ar": ar_s}, "compiled_equals_eager": same}  # fmt: skip
    report.add("digits", md, data)


def table(rows: list[dict], model: bool = False) -> str:
    head = "| model " * model + "| batch | dtype | compile | images/s | first call s | peak GiB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [r["model"]] if model else []
        cells += [r["batch"], r["dtype"], "yes" if r["compile"] else "no"]
        if "error" in r:
            cells += [r["error"], "", ""]
        else:
            cells += [f"{r['images_per_s']:.1f}", f"{r['first_call_s']:.1f}",
                      f"{r['peak_gib']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def paper_scale(report: Report, model_name: str) -> None:
    a = report.args
    paper = PAPER_MODELS[model_name]
    rq_cfg = paper.transformer_config()
    rq_cfg.dropout = 0.0
    flat_cfg = paper.transformer_config()
    flat_cfg.dropout, flat_cfg.code_shape = 0.0, [16, 16, 1]
    flat_cfg.spatial_layers, flat_cfg.depth_layers = rq_cfg.spatial_layers + rq_cfg.depth_layers, 0

    def build(cfg) -> RQTransformer:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            n_books = 1 if cfg.shared_codebook else cfg.D
            m = RQTransformer(cfg, torch.randn(n_books, cfg.codebook_size, cfg.embed_dim))
        return m.to(torch.bfloat16).eval()

    models = {"rq": build(rq_cfg), "flat": build(flat_cfg)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    plan = [("rq", b, False) for b in a.paper_batches] + [
        ("flat", b, False) for b in a.flat_batches
    ]
    plan += [(k, b, True) for k in models for b in a.compile_batches]  # compiled last: slow
    rows = []
    for name, b, compile in plan:

        def run(name=name, b=b, compile=compile):
            m = models[name]
            cond = torch.arange(b, device=DEVICE) % max(m.config.num_classes, 1)
            s = SamplingConfig(compile=compile)  # the paper's speed: no guidance
            gen = lambda: torch.Generator(DEVICE).manual_seed(0)  # noqa: E731
            skips = cudagraph_skips()
            _, first, best, peak = timed(lambda: sample_codes(m, cond, s, gen()), 2)
            return {"images_per_s": b / best, "first_call_s": first, "peak_gib": peak,
                    "cudagraph_skips": cudagraph_skips() - skips}  # fmt: skip

        row = {"model": name, "batch": b, "dtype": "bf16", "compile": compile}
        rows.append(guarded(report, row, run))
        report.add(model_name, paper_markdown(model_name, rq_cfg, flat_cfg, params, rows),
                   {"rows": rows, "params": params})  # fmt: skip
    # free this model's weights, caches and CUDA graph pools before the next one: the next
    # model's peak memory would otherwise include them
    models.clear()
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def paper_markdown(model_name: str, rq_cfg, flat_cfg, params: dict, rows: list[dict]) -> str:
    ratios = []
    for r in rows:
        f = [x for x in rows if x["model"] == "flat" and x["batch"] == r["batch"]
             and x["compile"] == r["compile"] and "images_per_s" in x]  # fmt: skip
        if r["model"] == "rq" and "images_per_s" in r and f:
            speedup = r["images_per_s"] / f[0]["images_per_s"]
            ratios.append(f"batch {r['batch']}{', compiled' * r['compile']}: {speedup:.2f}x")
    return (
        f"## Paper scale: {model_name}\n\nRandom weights, bf16, no guidance, best of 2 "
        f"batches. RQ: {rq_cfg.spatial_layers}+{rq_cfg.depth_layers} layers, width "
        f"{rq_cfg.width}, 8x8x4 codes, K {rq_cfg.codebook_size}, {params['rq'] / 1e9:.2f}B "
        f"parameters; flat: {flat_cfg.spatial_layers} layers on 16x16x1, "
        f"{params['flat'] / 1e9:.2f}B. The paper (Fig. 4, A100): RQ 4.1x the flat "
        "model at batch 100, 5.6x at batch 200, 0.02 s per image at batch 500.\n\n"
        + table(rows, model=True)
        + f"\n\nRQ over flat: {'; '.join(ratios) or 'not measured'}\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-steps", type=int, default=150)
    p.add_argument("--ar-steps", type=int, default=400)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--paper-model", nargs="+", default=["ar-imagenet-1.4b"],
                   choices=[*sorted(PAPER_MODELS), "none"])  # fmt: skip
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument(
        "--train",
        action="store_true",
        help="also the training check (gpu_train.py -> results/gpu_train.md)",
    )
    p.add_argument("--name", default="gpu", help="results/NAME.md")
    p.add_argument("--paper-batches", type=int, nargs="+", default=[100, 200, 500])
    p.add_argument("--flat-batches", type=int, nargs="+", default=[100, 200])
    p.add_argument(
        "--compile-batches",
        type=int,
        nargs="+",
        default=[200],
        help="paper scale: the batches also timed compiled (each compiles anew)",
    )
    p.add_argument("--budget-s", type=float, default=420, help="skip rows after this long")
    p.add_argument("--out", help="keep the trained models here (default: a temporary folder)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch: run it on a GPU machine")
    # one compilation per model, batch and dtype: more than dynamo's default limit of 8
    # would silently fall back to eager and time that as "compiled"
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    report = Report(args)
    if not args.skip_digits:
        digits(report)
    for name in args.paper_model:
        if name != "none":
            paper_scale(report, name)
    if args.train:
        import gpu_train

        gpu_train.main(["--device", DEVICE])
        print((RESULTS / "gpu_train.md").read_text())
    if report.sections:
        print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
