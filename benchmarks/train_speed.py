"""Training throughput: samples/s, achieved TFLOP/s, MFU and peak memory of one training
step (forward, loss, backward, optimizer) for the stage-1 and stage-2 presets.

    python benchmarks/train_speed.py --quick          # CPU rows in a few minutes
    python benchmarks/train_speed.py                  # all rows that fit this machine
    python benchmarks/train_speed.py --device cuda    # bf16 autocast on a GPU
    ... --json                                        # the rows as JSON on stdout

What is timed is the model's step on random inputs of the preset's shape: stage 2 the
RQ-Transformer on argmin codes (hard labels; soft-label targets and the feature store are
left out), AdamW; stage 1 the RQ-VAE with MSE + commitment and Adam (no LPIPS, whose VGG
weights cannot be fetched here, and no discriminator). Each row runs in a fresh process,
so its peak memory (resident set on CPU, allocator peak on CUDA) is its own; on CPU
"of it the step" leaves out what the process held before building the model (torch).

FLOPs per sample. Stage 2: written out from the config (matrix products only, forward ×3
for forward + backward, attention over the full context as nanoGPT counts it):

    spatial inputs   2·e·C per code of positions 0..T-2     (input_mlp)
    spatial blocks   24·C² + 4·C·Ls per token, Ls = cond + T - 1 tokens
    depth inputs     2·e·C per partial sum, T·(D-1) of them  (head_mlp)
    depth blocks     24·C² + 4·C·D per token, T·D tokens
    classifier       2·C·K per token, T·D tokens

and checked against torch's FLOP counter (`counted / analytic` in the JSON). Stage 1 has
no such closed form here: its FLOPs are torch's FLOP counter's count of one step.
MFU = achieved FLOP/s / peak: on CPU the peak is the measured fp32 matrix product rate
(a 2048³ product, best of 10, at the same thread count, measured once per run); on a GPU the
datasheet's dense bf16 rate (--peak-tflops to override). `plan_mem_gib`: `rqgen plan`'s
estimate of weights + gradients + AdamW + activations at this micro-batch (stage 2 only).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from rqgen.configs import ar_transformer_config, load_ar_experiment, load_vae_experiment  # noqa: E402
from rqgen.stage1.rqvae import RQVAE  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer  # noqa: E402
from rqgen.train.parallel import transformers  # noqa: E402
from rqgen.train.plan import GiB, activation_bytes, count_params  # noqa: E402

GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16, datasheets
# stage 2 preset -> the stage-1 preset whose codes it models
AR_CODES = {
    "ar-tiny": "tiny32",
    "ar-64": "rq64",
    "ar-imagenet-480m": "imagenet256",
    "ar-imagenet-1.4b": "imagenet256",
}
CPU_BATCH = {
    "tiny32": 16,
    "rq64": 8,
    "imagenet256": 1,
    "ar-tiny": 16,
    "ar-64": 8,
    "ar-imagenet-480m": 1,
    "ar-imagenet-1.4b": 1,
}
GPU_BATCH = {
    "tiny32": 128,
    "rq64": 64,
    "imagenet256": 16,
    "ar-tiny": 256,
    "ar-64": 128,
    "ar-imagenet-480m": 32,
    "ar-imagenet-1.4b": 16,
}
QUICK = [
    ("ar-tiny", "eager"),
    ("ar-tiny", "checkpointing"),
    ("ar-64", "eager"),
    ("tiny32", "eager"),
]
FULL = [
    *QUICK,
    ("ar-tiny", "compile"),
    ("ar-64", "checkpointing"),
    ("ar-64", "compile"),
    ("rq64", "eager"),
    ("imagenet256", "eager"),
    ("ar-imagenet-480m", "eager"),
    ("ar-imagenet-1.4b", "eager"),
]


def transformer_config(name: str):
    vae = load_vae_experiment(AR_CODES[name]).model
    m = load_ar_experiment(name).model
    classes = 1000 if m.conditioning == "class" else 0
    return ar_transformer_config(m, vae.codebook_size, list(vae.code_shape), vae.embed_dim, classes)


def ar_flops_per_sample(cfg) -> float:
    """Forward + backward FLOPs of one sample (see the module docstring)."""
    C, T, D, e, K = cfg.width, cfg.T, cfg.D, cfg.embed_dim, cfg.codebook_size
    ls = cfg.cond_length + T - 1
    fwd = 2 * e * C * (T - 1) * D
    fwd += cfg.spatial_layers * ls * (24 * C * C + 4 * C * ls)
    fwd += 2 * e * C * T * (D - 1)
    fwd += cfg.depth_layers * T * D * (24 * C * C + 4 * C * D)
    fwd += 2 * C * K * T * D
    return 3.0 * fwd


def build(name: str, variant: str, device: torch.device, batch: int):
    """(model, optimizer, step function, analytic FLOPs per sample or None, plan bytes)."""
    if name in AR_CODES:
        cfg = transformer_config(name)
        model = RQTransformer(cfg).to(device)
        for t in transformers(model):
            t.checkpointing = variant == "checkpointing"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        forward = torch.compile(model) if variant == "compile" else model
        codes = torch.randint(cfg.codebook_size, (batch, cfg.T, cfg.D), device=device)
        cond = torch.randint(max(1, cfg.num_classes), (batch,), device=device)

        def loss():
            return model.loss_from_logits(*forward(codes, cond), codes, cond)[0]

        params, _ = count_params(cfg)
        precision = "fp32" if device.type == "cpu" else "bf16"
        act = activation_bytes(cfg, precision, False, variant == "checkpointing")
        return model, opt, loss, ar_flops_per_sample(cfg), 16 * params + batch * act
    m = load_vae_experiment(name).model
    model = RQVAE(m).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if variant == "compile" else model
    x = torch.rand(batch, m.in_channels, m.resolution, m.resolution, device=device) * 2 - 1

    def loss():
        out = forward(x)
        return torch.nn.functional.mse_loss(out.reconstruction.float(), x) + out.commitment_loss

    return model, opt, loss, None, None


def measure_peak_tflops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), float("nan"))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e12


def run_row(name: str, variant: str, device_name: str, seconds: float, peak: float | None) -> dict:
    """One row, in this (fresh) process."""
    device = torch.device(device_name)
    batch = (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[name]
    base_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # torch itself
    model, opt, loss, analytic, plan_bytes = build(name, variant, device, batch)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            value = loss()
        value.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()  # also the first (warm-up, compilation) step
    counted = counter.get_total_flops() / batch
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0 < seconds and n < 50):
        step()
        n += 1
    sync()
    step_s = (time.perf_counter() - t0) / n
    flops = analytic if analytic is not None else counted
    achieved = flops * batch / step_s / 1e12
    peak = peak or measure_peak_tflops(device)
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / GiB
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    return {
        "config": name,
        "stage": "ar" if name in AR_CODES else "vae",
        "variant": variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "width": getattr(model.config, "width", None),
        "micro_batch": batch,
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "flops_per_sample": flops,
        "counted_over_analytic": counted / analytic if analytic else None,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak,
        "peak_mem_gib": peak_mem,
        "base_mem_gib": base_mem if device.type == "cpu" else 0.0,
        "plan_mem_gib": plan_bytes / GiB if plan_bytes else None,
        "params": sum(p.numel() for p in model.parameters()),
    }


def profile_row(name: str, device_name: str) -> tuple[list, list]:
    """Where a step's time goes: self CPU time by operator family over 3 steps, and the
    largest operators outside the families."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device_name)
    model, opt, loss, _, _ = build(name, "eager", device, CPU_BATCH[name])

    def step():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    families = {
        "matrix products": ("mm", "addmm", "bmm", "linear", "matmul"),
        "attention": ("scaled_dot_product", "_flash", "_efficient_attention"),
        "layer norm": ("layer_norm",),
        "GELU": ("gelu",),
        "softmax / cross-entropy": ("softmax", "nll_loss", "cross_entropy"),
        "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt"),
        "copies": ("copy_", "clone", "cat", "contiguous", "to", "_to_copy"),
    }
    total, shares, others = 0.0, {k: 0.0 for k in [*families, "other"]}, {}
    for event in prof.key_averages():
        us = event.self_cpu_time_total
        total += us
        op = event.key.removeprefix("aten::")
        family = next((f for f, keys in families.items() if any(k in op for k in keys)), "other")
        shares[family] += us
        if family == "other":
            others[event.key] = others.get(event.key, 0.0) + us
    top = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    ranked = sorted(((k, v / total) for k, v in shares.items()), key=lambda kv: -kv[1])
    return ranked, [(k, v / total) for k, v in top]


def planned_bytes(name: str, device_name: str) -> float:
    """rqgen plan's bytes for a stage-2 row (0 for stage 1: no estimate)."""
    if name not in AR_CODES:
        return 0.0
    cfg = transformer_config(name)
    params, _ = count_params(cfg)
    gpu = device_name.startswith("cuda")
    batch = (GPU_BATCH if gpu else CPU_BATCH)[name]
    return 16 * params + batch * activation_bytes(cfg, "bf16" if gpu else "fp32", False, False)


def available_bytes(device_name: str) -> float:
    if device_name.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device_name)).total_memory
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def table(rows: list[dict]) -> str:
    lines = [
        "| config | stage | variant | device | threads | width | micro-batch | samples/s "
        "| GFLOP/sample | achieved TFLOP/s | MFU | peak GiB | of it the step | plan GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['config']} | {r['stage']} | {r['variant']} | {r['device']} "
                f"| | | | skipped: {r['skipped']} | | | | | | |"
            )
            continue
        plan = f"{r['plan_mem_gib']:.2f}" if r["plan_mem_gib"] else "-"
        lines.append(
            f"| {r['config']} | {r['stage']} | {r['variant']} | {r['device']} | {r['threads']} "
            f"| {r['width'] or '-'} | {r['micro_batch']} | {r['samples_per_s']:.2f} "
            f"| {r['flops_per_sample'] / 1e9:.2f} | {r['achieved_tflops']:.4f} "
            f"| {100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.2f} "
            f"| {r['peak_mem_gib'] - r.get('base_mem_gib', 0.0):.2f} | {plan} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU rows of QUICK only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-write", action="store_true", help="leave benchmarks/results alone")
    p.add_argument("--rows", help="CONFIG:VARIANT,... instead of the default rows")
    p.add_argument("--name", help="results/NAME.md (default: train_speed, or _gpu on CUDA)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: NAME:VARIANT in this process
    args = p.parse_args()
    if args.row:
        name, variant = args.row.split(":")
        print(json.dumps(run_row(name, variant, args.device, args.seconds, args.peak_tflops)))
        return
    rows = []
    peak = args.peak_tflops or measure_peak_tflops(torch.device(args.device))
    chosen = [tuple(r.split(":")) for r in args.rows.split(",")] if args.rows else None
    for name, variant in chosen or (QUICK if args.quick else FULL):
        if (need := planned_bytes(name, args.device)) > 0.6 * available_bytes(args.device):
            rows.append(
                {
                    "config": name,
                    "stage": "ar",
                    "variant": variant,
                    "device": args.device,
                    "skipped": f"needs ~{need / GiB:.0f} GiB by rqgen plan",
                }
            )
            continue
        cmd = [
            sys.executable,
            __file__,
            "--row",
            f"{name}:{variant}",
            "--device",
            args.device,
            "--seconds",
            str(args.seconds),
            "--peak-tflops",
            str(peak),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
            rows.append(
                {
                    "config": name,
                    "stage": "ar" if name in AR_CODES else "vae",
                    "variant": variant,
                    "device": args.device,
                    "skipped": why[:120],
                }
            )
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
    if args.no_write:
        return
    about = [
        f"```\n{textwrap.dedent(p)}\n```" if p.startswith("    ") else p
        for p in __doc__.split("\n\n")[2:]
    ]  # the usage lines left out
    body = ["# Training throughput", "", *about, "", table(rows)]
    if args.device == "cpu" and not args.rows:
        shares, top = profile_row("ar-64", "cpu")
        body += [
            "",
            "Where an eager ar-64 step (width 512) spends its CPU time (self time by operator "
            "family, 3 steps, torch profiler):",
            "",
            "| family | share |",
            "|---|---|",
            *[f"| {k} | {100 * v:.1f}% |" for k, v in shares],
            "",
            "The largest operators outside those families:",
            "",
            "| operator | share |",
            "|---|---|",
            *[f"| `{k}` | {100 * v:.1f}% |" for k, v in top],
        ]
    name = args.name or ("train_speed" if args.device == "cpu" else "train_speed_gpu")
    write_results(name, "\n".join(body), {"rows": rows})


if __name__ == "__main__":
    main()
