"""One command for a CUDA machine: train both stages briefly on the bundled digits, then
sample in fp32 and bf16, eager and compiled, and write images/s and peak GPU memory to
benchmarks/results/gpu.md.

    python benchmarks/gpu_check.py                  # ~5 minutes on one GPU
    python benchmarks/gpu_check.py --vae-steps 50 --ar-steps 100 --batches 64 256

Checks on the way that the GPU paths hold: training in the default precision (bf16 where
supported), the compiled sampler drawing the same codes as the eager one in fp32, and bf16
samples decoding to valid images. Exits with one line where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from rqgen.configs import load_ar_experiment, load_vae_experiment  # noqa: E402
from rqgen.stage2.sampling import SamplingConfig, load_for_sampling, sample_codes  # noqa: E402
from rqgen.train.ar import train_ar  # noqa: E402
from rqgen.train.vae import train_vae  # noqa: E402


def timed_training(fn) -> tuple[Path, float, float]:
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def sampling_row(ar_dir: Path, dtype: str, compile: bool, batch: int, reps: int) -> dict:
    model, vae, _, _ = load_for_sampling(ar_dir, device="cuda", dtype=dtype)
    cond = torch.arange(batch, device="cuda") % model.config.num_classes
    cfg = SamplingConfig(cfg_scale=2.0, compile=compile)
    t = time.perf_counter()
    sample_codes(model, cond, cfg, torch.Generator("cuda").manual_seed(0))  # (compiles)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        codes = sample_codes(model, cond, cfg, torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    images = vae.decode_codes(codes).clamp(-1, 1)
    assert torch.isfinite(images).all(), f"{dtype} samples decode to non-finite pixels"
    return {"dtype": dtype, "compile": compile, "batch": batch, "images_per_s": batch / best,
            "first_call_s": first, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "codes": codes.cpu()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae-steps", type=int, default=150)
    p.add_argument("--ar-steps", type=int, default=400)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--out", help="keep the trained models here (default: a temporary folder)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch: run it on a GPU machine")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        vae_exp = load_vae_experiment("tiny32", [f"train.steps={args.vae_steps}"])
        vae_dir, vae_s, vae_mem = timed_training(
            lambda: train_vae(vae_exp, "bundled:digits", out / "vae", device="cuda")
        )
        ar_exp = load_ar_experiment("ar-tiny", [f"train.steps={args.ar_steps}"])
        ar_dir, ar_s, ar_mem = timed_training(
            lambda: train_ar(ar_exp, vae_dir, "bundled:digits", out / "ar", device="cuda")
        )
        rows = []
        for batch in args.batches:
            for dtype in ("fp32", "bf16"):
                for compile in (False, True):
                    rows.append(sampling_row(ar_dir, dtype, compile, batch, reps=3))
                    print({k: v for k, v in rows[-1].items() if k != "codes"}, flush=True)
    same = {r["batch"]: bool(torch.equal(r["codes"], e["codes"]))
            for r in rows for e in rows
            if r["batch"] == e["batch"] and r["dtype"] == e["dtype"] == "fp32"
            and r["compile"] and not e["compile"]}  # fmt: skip
    prec = vae_exp.train.precision
    body = (
        "# GPU check\n\n"
        f"Training (tiny32 RQ-VAE {args.vae_steps} steps, ar-tiny {args.ar_steps} steps, "
        f"bundled digits, precision {prec}): stage 1 {vae_s:.0f} s (peak {vae_mem:.2f} GiB), "
        f"stage 2 {ar_s:.0f} s (peak {ar_mem:.2f} GiB).\n\n"
        "Sampling (codes only, classifier-free guidance 2, best of 3 batches; first call "
        "includes compilation):\n\n"
        "| batch | dtype | compile | images/s | first call s | peak GiB |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['batch']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | "
            f"{r['images_per_s']:.1f} | {r['first_call_s']:.1f} | {r['peak_gib']:.2f} |"
            for r in rows
        )
        + f"\n\nCompiled fp32 codes equal eager fp32 codes, per batch: {same}\n"
    )
    data = {"rows": [{k: v for k, v in r.items() if k != "codes"} for r in rows],
            "train_s": {"vae": vae_s, "ar": ar_s}, "compiled_equals_eager": same}  # fmt: skip
    print(write_results("gpu", body, data).read_text())


if __name__ == "__main__":
    main()
