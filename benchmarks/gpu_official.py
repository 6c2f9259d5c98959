"""The official RQ-Transformer sampler and rqgen's on the same weights and the same GPU (#28).

The paper's 1.4B ImageNet model (42 + 6 layers, width 1536, 24 heads, K 16384, 8×8×4 codes,
1000 classes; random weights) is built by the official code the way its measure_throughput
does, then converted in memory by `rqgen.convert.official`. Both draw class-conditional
code maps without guidance (temperature 1, no top-k), timed from the first to the last
code with the GPU synchronised, best of --repeats after a warm-up:

- official fp32 with TF32 off (PyTorch's default, what the official code runs with) and on;
- rqgen fp32 with TF32 on (what rqgen sets on a GPU), bf16, and bf16 compiled.

First the teacher-forced logits of both are compared on the same codes (fp32, TF32 off),
so the timed pair is shown to be one model. Achieved TFLOP/s count the sampler's products
analytically (sampling_speed.sampler_flops) against the GPU's dense bf16 peak. Needs the
official code as an exported work tree (`--official`), importable by this Python:

    python benchmarks/gpu_official.py --official TREE [--batches 100 200 500]

Rows past --budget-s are skipped; results/gpu_official.md is rewritten after every row.
`--tiny` builds a small model instead, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import Report, guarded  # noqa: E402
from sampling_speed import sampler_flops  # noqa: E402
from train_speed import GPU_PEAK_TFLOPS  # noqa: E402

from rqgen.convert.official import (  # noqa: E402
    convert_stage1_state,
    convert_stage2_state,
    stage1_config,
    stage2_config,
)
from rqgen.stage1.rqvae import RQVAE  # noqa: E402
from rqgen.stage2.rq_transformer import RQTransformer  # noqa: E402
from rqgen.stage2.sampling import SamplingConfig, sample_codes  # noqa: E402

# (width, heads, spatial layers, depth layers, K, classes): measure_throughput's "huge"
SIZES = {"1.4B": (1536, 24, 42, 6, 16384, 1000), "tiny": (64, 2, 2, 1, 64, 10)}


def official_models(tree: Path, size: str, device: str):
    """Stage 1 and stage 2 of the official code, random weights, and their arch dicts."""
    sys.path.insert(0, str(tree.resolve()))
    from omegaconf import OmegaConf
    from rqvae.models import create_model
    from rqvae.utils.config import augment_arch_defaults, load_config

    width, heads, spatial, depth, k, classes = SIZES[size]
    defaults = load_config(tree / "measure_throughput" / "rq_defaults.yaml")
    s1 = defaults.rqvae_f32.copy()
    s1.hparams.code_shape, s1.hparams.n_embed = [8, 8, 4], k
    if size == "tiny":  # only the codebook is used while sampling
        s1.ddconfig.ch, s1.ddconfig.num_res_blocks = 32, 1
    s2 = defaults.rqtransformer.copy()
    s2.block_size, s2.vocab_size, s2.embed_dim, s2.vocab_size_cond = [8, 8, 4], k, width, classes
    s2.body.n_layer, s2.head.n_layer = spatial, depth
    s2.body.block.n_head = s2.head.block.n_head = heads
    s1, s2 = augment_arch_defaults(s1), augment_arch_defaults(s2)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # their decoder prints its shapes
        aux, ar = create_model(s1)[0], create_model(s2)[0]
    arch = [OmegaConf.to_container(s, resolve=True) for s in (s1, s2)]
    return aux.to(device).eval(), ar.to(device).eval(), arch


def converted(aux, ar, arch: list[dict], device: str) -> RQTransformer:
    """rqgen's RQTransformer holding the official model's weights."""
    c1 = stage1_config(arch[0])
    vae = RQVAE(c1)
    vae.load_state_dict(convert_stage1_state({k: v.cpu() for k, v in aux.state_dict().items()}, c1))
    c2 = stage2_config(arch[1], vae)
    with torch.device(device):
        model = RQTransformer(c2, vae.quantizer.codebook.to(device))
    model.load_state_dict(convert_stage2_state(ar.state_dict(), c2, vae))
    return model.eval()


def logit_gap(aux, ar, model: RQTransformer, device: str) -> float:
    """Largest |official − rqgen| teacher-forced logit on the same random codes, fp32."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, model.config.codebook_size, (2, 8, 8, 4), generator=g).to(device)
    cond = torch.randint(0, model.config.num_classes, (2, 1), generator=g).to(device)
    with tf32(False):
        ref = ar(codes, model_aux=aux, cond=cond)  # (B, H, W, D, K)
        ours = model(codes, cond[:, 0])[0]
    return float((ours.reshape(ref.shape) - ref).abs().max())


@contextlib.contextmanager
def tf32(on: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def best_of(fn, repeats: int, device: str) -> tuple[float, float]:
    """(first call s, best of `repeats` later calls s), the device synchronised around each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times[0], min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, help="exported official work tree")
    p.add_argument("--batches", type=int, nargs="+", default=[100, 200, 500])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420, help="skip rows after this long")
    p.add_argument("--tiny", action="store_true", help="a small model: check the script")
    p.add_argument("--name", default="gpu_official", help="results/NAME.md")
    args = p.parse_args()
    if args.official is None or not (args.official / "rqvae").is_dir():
        sys.exit("gpu_official: give --official TREE, a work tree of kakaobrain/rq-vae-transformer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("gpu_official: no CUDA device visible to torch (--tiny checks it on a CPU)")
    for name in ("cache_size_limit", "recompile_limit"):  # one compilation per batch size
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch.set_grad_enabled(False)
    size = "tiny" if args.tiny else "1.4B"
    aux, ar, arch = official_models(args.official, size, device)
    model = converted(aux, ar, arch, device)
    gap = logit_gap(aux, ar, model, device)
    copies: list[RQTransformer] = []  # the bf16 model, made when first needed
    gflop = sampler_flops(model) / 1e9
    peak = GPU_PEAK_TFLOPS.get(next((k for k in GPU_PEAK_TFLOPS if k in machine_name()), ""))
    report, rows = Report(args), []
    classes = model.config.num_classes

    def official(batch: int, tf32_on: bool):
        cond = (torch.arange(batch, device=device) % classes)[:, None]
        empty = torch.zeros(batch, 8, 8, 4, dtype=torch.long, device=device)
        torch.manual_seed(0)  # their draws use the global generator
        with tf32(tf32_on):
            return best_of(lambda: ar.sample(empty, model_aux=aux, cond=cond), args.repeats, device)

    def ours(batch: int, dtype: str, compile: bool):
        if dtype == "bf16" and not copies:
            copies.append(copy.deepcopy(model).to(torch.bfloat16).eval())
        m = copies[0] if dtype == "bf16" else model
        cond = torch.arange(batch, device=device) % classes
        cfg = SamplingConfig(compile=compile)
        gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
        with tf32(True):
            return best_of(lambda: sample_codes(m, cond, cfg, gen()), args.repeats, device)

    samplers = {f"official fp32, TF32 {'on' if t else 'off'}": lambda b, t=t: official(b, t)
                for t in (False, True)}  # fmt: skip
    samplers |= {f"rqgen {d}{', compiled' * c}": lambda b, d=d, c=c: ours(b, d, c)
                 for d, c in (("fp32", False), ("bf16", False), ("bf16", True))}  # fmt: skip
    # eager rows first; compiled ones (each batch compiles anew) last, the largest batch first
    plan = [(b, k) for b in args.batches for k in samplers if "compiled" not in k]
    plan += [(b, k) for b in sorted(args.batches)[::-1] for k in samplers if "compiled" in k]
    for batch, name in plan:

        def row(run=samplers[name], batch=batch):
            first, best = run(batch)
            return {"first_call_s": first, "images_per_s": batch / best,
                    "tflops": batch * gflop / best / 1e3}  # fmt: skip

        rows.append(guarded(report, {"sampler": name, "batch": batch}, row))
        data = {"rows": rows, "logit_gap": gap, "gflop_per_image": gflop, "peak": peak}
        report.add("official", markdown(rows, size, gap, gflop, peak), data)


def machine_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def markdown(rows: list[dict], size: str, gap: float, gflop: float, peak: float | None) -> str:
    lines = ["| sampler | batch | images/s | × official fp32 (TF32 off) | TFLOP/s | % of bf16 "
             "peak | first call s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['sampler']} | {r['batch']} | {r['error']} | | | | |")
            continue
        base = [x for x in rows if x["batch"] == r["batch"] and "images_per_s" in x
                and x["sampler"] == "official fp32, TF32 off"]  # fmt: skip
        ratio = f"{r['images_per_s'] / base[0]['images_per_s']:.2f}" if base else ""
        share = f"{100 * r['tflops'] / peak:.0f}%" if peak else ""
        lines.append(
            f"| {r['sampler']} | {r['batch']} | {r['images_per_s']:.1f} | {ratio} "
            f"| {r['tflops']:.1f} | {share} | {r['first_call_s']:.1f} |"
        )
    return (
        f"## {size} model, official sampler and rqgen on the same weights ({machine_name()})\n\n"
        f"Teacher-forced logits, official − rqgen, fp32 with TF32 off: largest gap {gap:.2e}. "
        f"{gflop:.0f} GFLOP of products per image (analytic); bf16 dense peak "
        f"{peak or 'unknown'} TFLOP/s. No guidance, temperature 1, no top-k; codes only (no "
        "decoding); best of the timed batches after a first call.\n\n" + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
