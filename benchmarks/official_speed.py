"""rqgen's sampler against the official RQ-Transformer sampler (kakaobrain/rq-vae-transformer)
on the very same weights, on this CPU, fp32.

The official code is not part of rqgen: give a runnable copy of it (a work tree whose
`rqtransformer/configs.py` takes `default_factory` on Python >= 3.11), a Python that can
import it, and the script that builds its models (the one that exports official-layout
checkpoints with random weights, `--export-official`):

    python benchmarks/official_speed.py --official TREE --official-python VENV/bin/python \\
        --official-bench PATH/official_sampling_bench.py [--batches 1,16,64,256]

Without them it says so and exits 0. For each configuration (width 256, 6+2 layers, K 512;
width 512, 8+4 layers, K 2048; 8×8×4 codes, 10 classes) the official models are built with
random weights and exported; `rqgen convert-official` turns them into ours. Both samplers
then draw class-conditional code maps (no decoding, temperature 1, no top-k) at each batch
size, timed two ways: process CPU time with 1 thread (robust to a busy machine) and wall
time with 2 threads. Each number is the median of --repeats runs after one warm-up
(none at batch 256, where first-call costs vanish).
Results: benchmarks/results/official_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name: (width, heads, spatial layers, depth layers, K)
    "w256-6+2-K512": (256, 4, 6, 2, 512),
    "w512-8+4-K2048": (512, 8, 8, 4, 2048),
}


def timed(fn, repeats: int, threads: int, warm_up: bool = True) -> dict:
    """Median process-CPU seconds (1 thread) or wall seconds (2 threads) of fn()."""
    import torch

    torch.set_num_threads(threads)
    clock = time.process_time if threads == 1 else time.perf_counter
    if warm_up:
        fn(0)
    secs = []
    for r in range(repeats):
        t0 = clock()
        fn(r + 1)
        secs.append(clock() - t0)
    return {"seconds": statistics.median(secs), "runs": [round(s, 4) for s in secs]}


def worker_official(args) -> dict:
    """Runs under the official code's Python: build, export, time."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("official_bench", args.official_bench)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sys.path.insert(0, os.path.abspath(args.official))
    torch.set_grad_enabled(False)
    width, heads, spatial, depth, k = CONFIGS[args.config]
    a = argparse.Namespace(embed_dim=width, spatial_layers=spatial, depth_layers=depth,
                           heads=heads, vocab=k, code_shape="8,8,4", embed_dim_vae=64, seed=0,
                           temperature=1.0)  # fmt: skip
    stage1, stage2 = bench.arch_configs(a)
    aux, ar = bench.build(a, stage1, stage2)
    bench.export_official(args.export, (aux, stage1), (ar, stage2))
    out = {}
    for batch in args.batches:

        def run(r, b=batch):
            gen = torch.Generator().manual_seed(100 + r)
            torch.manual_seed(100 + r)  # their sampler draws from the global generator
            bench.sample(a, ar, aux, b, None, None, gen)

        out[batch] = both_modes(run, args.repeats, batch)
    return out


def both_modes(run, repeats: int, batch: int) -> dict:
    # a warm-up pays first-call costs; at batch 256 they vanish in a 10-60 s run
    warm = batch <= 64
    return {"cpu_1t": timed(run, repeats, 1, warm), "wall_2t": timed(run, repeats, 2, warm)}


def worker_rqgen(args) -> dict:
    """Runs under rqgen's Python: convert the exported weights, time sample_codes."""
    import torch

    from rqgen.convert.official import convert_stage1, convert_stage2
    from rqgen.stage2.sampling import SamplingConfig, sample_codes

    torch.set_grad_enabled(False)
    vae = convert_stage1(Path(args.export) / "stage1")
    model = convert_stage2(Path(args.export) / "stage2", vae).eval()
    out = {}
    for batch in args.batches:

        def run(r, b=batch):
            gen = torch.Generator().manual_seed(100 + r)
            cond = torch.randint(0, 10, (b,), generator=gen)
            sample_codes(model, cond, SamplingConfig(), gen)

        out[batch] = both_modes(run, args.repeats, batch)
    return out


def run_worker(python: str, kind: str, args, config: str, export: str) -> dict:
    cmd = [python, __file__, "--worker", kind, "--config", config, "--export", export,
           "--batches", ",".join(map(str, args.batches)), "--repeats", str(args.repeats),
           "--official", args.official or "",
           "--official-bench", args.official_bench or ""]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", help="runnable official work tree")
    p.add_argument("--official-python", help="a Python that imports it (torch 2.13 CPU)")
    p.add_argument("--official-bench", help="the script that builds and exports its models")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--worker", choices=["official", "rqgen"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        work = worker_official if args.worker == "official" else worker_rqgen
        print(json.dumps(work(args)))
        return
    given = (args.official, args.official_python, args.official_bench)
    if not all(given) or not all(Path(x).exists() for x in given):
        print("official_speed: skipped: give --official TREE --official-python PYTHON "
              "--official-bench SCRIPT (a runnable copy of the official code; see the "
              "docstring)")  # fmt: skip
        return
    rows = []
    for config in args.configs.split(","):
        with tempfile.TemporaryDirectory() as export:
            official = run_worker(args.official_python, "official", args, config, export)
            ours = run_worker(sys.executable, "rqgen", args, config, export)
        for b in args.batches:
            o, q = official[str(b)], ours[str(b)]
            row = {"config": config, "batch": b}
            for mode in ("cpu_1t", "wall_2t"):
                row[f"official_{mode}"] = b / o[mode]["seconds"]
                row[f"rqgen_{mode}"] = b / q[mode]["seconds"]
                row[f"ratio_{mode}"] = o[mode]["seconds"] / q[mode]["seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    m = machine()
    cmd = ("python benchmarks/official_speed.py --official TREE --official-python PYTHON "
           f"--official-bench SCRIPT --batches {','.join(map(str, args.batches))} "
           f"--repeats {args.repeats}")  # fmt: skip
    lines = [
        "# rqgen vs the official RQ-Transformer sampler (same weights)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average "
        f"{os.getloadavg()[0]:.2f} at the end. Command: `{cmd}`.",
        "Images per second: `cpu 1t` = per CPU-second of the process at 1 thread, `wall 2t` =",
        f"per wall second at 2 threads; median of {args.repeats} runs after a warm-up (none at "
        "batch 256); codes "
        "only, no decoding; fp32; class-conditional, temperature 1, no top-k.",
        "",
        "| config | batch | official cpu 1t | rqgen cpu 1t | × | official wall 2t "
        "| rqgen wall 2t | × |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['official_cpu_1t']:.2f} | "
            f"{r['rqgen_cpu_1t']:.2f} | {r['ratio_cpu_1t']:.2f} | {r['official_wall_2t']:.2f} | "
            f"{r['rqgen_wall_2t']:.2f} | {r['ratio_wall_2t']:.2f} |"
        )
    out = Path(__file__).resolve().parent / "results" / "official_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
