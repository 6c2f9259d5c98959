"""The training half of the GPU check (`python benchmarks/gpu_check.py --train`), each part
written to benchmarks/results/gpu_train.md as soon as it is done:

1. throughput: train_speed.py's rows for the paper's 480M and 1.4B models in bf16, eager,
   compiled and with activation checkpointing (MFU against the GPU's dense bf16 peak; peak
   memory against `rqgen plan`);
2. FSDP2 on one NCCL rank with the bf16 MixedPrecisionPolicy: the loss of 3 steps against
   the same steps without FSDP, step time and peak memory;
3. CUDA randomness across a resume: ar-tiny on the digits with dropout, resumed at step 2
   against an unbroken run (CUDA generator saved and restored);
4. TF32 and the codebook search: the share of nearest codes that TF32 matrix products
   would change (rqgen searches without TF32).

    python benchmarks/gpu_check.py --train --skip-digits --paper-model none
    python benchmarks/gpu_train.py --device cpu --tiny     # the logic, on a CPU

Budget: about 6 minutes on one H100 / H200 (most of it compiling the 1.4B model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import write_results  # noqa: E402

from rqgen.configs import load_ar_experiment, load_vae_experiment  # noqa: E402
from rqgen.quantize.residual import ResidualQuantizer  # noqa: E402
from rqgen.train.ar import train_ar  # noqa: E402
from rqgen.train.state import TrainState  # noqa: E402
from rqgen.train.vae import train_vae  # noqa: E402

ROWS = (
    "ar-imagenet-480m:eager,ar-imagenet-480m:compile,ar-imagenet-480m:checkpointing,"
    "ar-imagenet-1.4b:eager,ar-imagenet-1.4b:compile,ar-imagenet-1.4b:checkpointing"
)


class Report:
    def __init__(self, name: str):
        self.name, self.sections, self.data = name, {}, {}

    def add(self, key: str, markdown: str, data) -> None:
        self.sections[key], self.data[key] = markdown, data
        write_results(
            self.name, "# GPU check: training\n\n" + "\n\n".join(self.sections.values()), self.data
        )


def throughput(report: Report, device: str, rows: str) -> None:
    cmd = [
        sys.executable,
        str(HERE / "train_speed.py"),
        "--device",
        device,
        "--rows",
        rows,
        "--seconds",
        "5",
        "--json",
        "--no-write",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    start = proc.stdout.find("{")
    result = json.loads(proc.stdout[start:]) if start >= 0 else {"rows": []}
    sys.path.insert(0, str(HERE))
    from train_speed import table

    md = "## Training throughput\n\n" + table(result["rows"]) if result["rows"] else proc.stderr
    report.add("throughput", md, result)


def _fsdp_worker(device: str, init: str, out: str, tiny: bool) -> None:
    """One rank of its own process group: the same 3 steps with and without FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from rqgen.stage2.rq_transformer import RQTransformer
    from rqgen.train.parallel import mixed_precision, transformers

    sys.path.insert(0, str(HERE))
    from train_speed import transformer_config

    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    dev = torch.device(device)
    cfg = transformer_config("ar-tiny" if tiny else "ar-imagenet-480m")
    batch = 4 if tiny else 16
    codes = torch.randint(cfg.codebook_size, (batch, cfg.T, cfg.D), device=dev)
    cond = torch.randint(max(1, cfg.num_classes), (batch,), device=dev)
    result = {}
    for sharded in (False, True):
        torch.manual_seed(0)
        model = RQTransformer(cfg).to(dev)
        if sharded:
            mp = mixed_precision("bf16")
            for t in transformers(model):
                for block in t.blocks:
                    fully_shard(block, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        losses, t0 = [], time.perf_counter()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model.loss(codes, cond)[0]
            loss.backward()
            opt.step()
            losses.append(float(loss))
        step_s = (time.perf_counter() - t0) / 3
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        result["fsdp" if sharded else "plain"] = {
            "losses": losses,
            "step_s": step_s,
            "peak_gib": peak,
        }
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def fsdp_one_rank(report: Report, device: str, tiny: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu_train; "
            f"gpu_train._fsdp_worker({device!r}, 'file://{tmp}/pg', {str(out)!r}, {tiny})"
        )
        env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
        )
        if proc.returncode != 0:
            report.add("fsdp", "## FSDP2, one rank\n\nfailed: " + proc.stderr[-600:], {})
            return
        r = json.loads(out.read_text())
    lines = [
        "## FSDP2 on one rank, bf16 MixedPrecisionPolicy (reduce fp32)",
        "",
        "| run | losses (3 steps) | s/step | peak GiB |",
        "|---|---|---|---|",
    ]
    for k in ("plain", "fsdp"):
        peak = f"{r[k]['peak_gib']:.2f}" if r[k]["peak_gib"] is not None else "-"
        losses = " / ".join(f"{v:.4f}" for v in r[k]["losses"])
        lines.append(f"| {k} | {losses} | {r[k]['step_s']:.3f} | {peak} |")
    report.add("fsdp", "\n".join(lines), r)


def rng_resume(report: Report, device: str, steps: int) -> None:
    """Dropout on the GPU draws from the CUDA generator: a resume restores it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        vae = train_vae(
            load_vae_experiment("tiny32", ["train.steps=20"]),
            "bundled:digits",
            out / "vae",
            device=device,
            quiet=True,
        )
        ar = ["train.eval_every=1000", "model.dropout=0.3", "train.stochastic_codes=false"]
        runs = {}
        for name, legs in (("straight", [steps]), ("resumed", [steps // 2, steps])):
            for n in legs:
                exp = load_ar_experiment("ar-tiny", [*ar, f"train.steps={n}"])
                train_ar(exp, vae, "bundled:digits", out / name, device=device, quiet=True)
            runs[name] = TrainState(out / name).tensors("model")
    diff = max(
        (runs["straight"][k] - runs["resumed"][k]).abs().max().item() for k in runs["straight"]
    )
    md = (
        f"## CUDA randomness across a resume\n\nar-tiny, dropout 0.3, {steps} steps unbroken "
        f"against {steps // 2} + {steps - steps // 2} resumed: largest weight difference "
        f"{diff:.3g} (0 = the same dropout masks were drawn)."
    )
    report.add("rng", md, {"max_abs_diff": diff})


def tf32_flips(report: Report, device: str) -> None:
    if not device.startswith("cuda"):
        report.add("tf32", "## TF32 and the codebook search\n\nno GPU: not measured", {})
        return
    torch.manual_seed(0)
    q = ResidualQuantizer(256, 16384, 4).to(device).eval()
    q.initialized.fill_(True)
    z = torch.randn(65536, 256, device=device) * 0.1
    exact = q.quantize(z)[0]
    torch.backends.cuda.matmul.allow_tf32 = True
    cb = q.codebook[0]
    tf32 = torch.addmm(cb.pow(2).sum(1), z, cb.t(), alpha=-2.0).argmin(1)
    share = (tf32 != exact[:, 0]).float().mean().item()
    md = (
        f"## TF32 and the codebook search\n\nFirst-depth nearest codes of 65,536 random "
        f"vectors (dim 256, K 16384) that a TF32 product would change: {100 * share:.3f}%."
    )
    report.add("tf32", md, {"changed_share": share})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small models: check the logic")
    p.add_argument("--name", default="gpu_train")
    args = p.parse_args(argv)
    report = Report(args.name)
    throughput(report, args.device, "ar-tiny:eager" if args.tiny else ROWS)
    fsdp_one_rank(report, args.device, args.tiny)
    rng_resume(report, args.device, 4 if args.tiny else 40)
    tf32_flips(report, args.device)


if __name__ == "__main__":
    main()
