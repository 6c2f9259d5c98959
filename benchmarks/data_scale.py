"""Stage-2 data path at scale (#12): peak memory per rank, start-up and resume time of
`train-ar` for growing folders, 1 and 2 ranks, this tree against an earlier revision.

The VAE is a random RQ-VAE whose features are the paper's ImageNet shape, 8×8×256 (64 KiB
per image in fp32), on 32 px images (digit crops in 10 class folders), so that the
numbers measure the data path, not the encoder. Each case runs

    train-ar --steps 1   (start-up: listing, feature extraction, loading, one step)
    train-ar --steps 2   (resume: from the step-1 checkpoint, one more step)

under `python -m torch.distributed.run --nproc_per_node W` (gloo) and reads every rank's
peak resident memory (VmHWM) at exit. The earlier revision runs from a `git worktree` of it.

    python benchmarks/data_scale.py --sizes 400 4400 16000 --before d528b1e
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FEATURE_BYTES = 8 * 8 * 256 * 4  # fp32 Z per image
AR = ["model.width=64", "model.heads=2", "model.spatial_layers=1", "model.depth_layers=1",
      "train.batch_size=32", "train.eval_every=1000", "train.sample_every=1000",
      "train.val_fraction=0.01"]  # fmt: skip

# run by every rank: the CLI, then this process's peak memory into $PEAK_DIR
PEAK = """
import os, sys
from rqgen.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
open(os.path.join(os.environ['PEAK_DIR'], os.environ.get('RANK', '0')), 'w').write(hwm.split()[1])
sys.exit(rc)
"""


def make_folder(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    from rqgen.data.bundled import BundledDigits

    if root.is_dir() and sum(1 for _ in root.rglob("*.png")) == n:
        return root
    shutil.rmtree(root, ignore_errors=True)
    digits = BundledDigits(32)
    for i in range(n):
        x, label = digits[i % len(digits)]
        img = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(img, i // len(digits), axis=1)).save(root / str(label) / f"{i}.png")
    return root


def make_vae(path: Path) -> Path:
    import torch

    from rqgen.stage1.rqvae import RQVAE, RQVAEConfig

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = RQVAEConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1,
                          attn_resolutions=[], z_channels=256, embed_dim=256,
                          codebook_size=512, code_depth=4)  # fmt: skip
        RQVAE(cfg).save_pretrained(path)
    return path


def run(tree: Path, world: int, args: list[str], peak_dir: Path) -> tuple[float, list[int]]:
    shutil.rmtree(peak_dir, ignore_errors=True)
    peak_dir.mkdir(parents=True)
    script = peak_dir.parent / "peak.py"
    script.write_text(PEAK)
    env = {**os.environ, "PYTHONPATH": str(tree), "PEAK_DIR": str(peak_dir),
           "OMP_NUM_THREADS": str(max(1, 2 // world))}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), str(script), *args]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, [int((peak_dir / str(r)).read_text()) * 1024 for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 4400, 16000])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--before", default="d528b1e", help="earlier revision to compare")
    ap.add_argument("--redo", nargs="*", default=[], help="versions to measure again")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "rqgen_data_scale"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    before_tree = work / "before"
    if not before_tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    vae = make_vae(work / "vae")
    cache = work / "rows.jsonl"  # rows measured earlier; --redo VERSION measures them again
    old = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    old = [r for r in old if r["version"] not in args.redo]
    rows = []
    for n in args.sizes:
        data = make_folder(work / f"images_{n}", n)
        for version, tree in (("before", before_tree), ("after", ROOT)):
            for world in args.worlds:
                done = [r for r in old if (r["images"], r["version"], r["ranks"]) ==
                        (n, version, world)]  # fmt: skip
                if done:
                    rows.append(done[-1])
                    continue
                out = work / f"ar_{version}_{n}_{world}"
                shutil.rmtree(out, ignore_errors=True)
                base = ["train-ar", "--vae", str(vae), "--data", str(data), "--out", str(out),
                        "--device", "cpu", *AR]  # fmt: skip
                start, peaks = run(tree, world, [*base, "--steps", "1"], work / "peaks")
                resume, rpeaks = run(tree, world, [*base, "--steps", "2"], work / "peaks")
                row = {"images": n, "version": version, "ranks": world, "start_s": start,
                       "resume_s": resume, "peak_bytes": peaks,
                       "resume_peak_bytes": rpeaks}  # fmt: skip
                print(json.dumps(row), flush=True)
                with open(cache, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    write_results("data_scale", table(rows, args.sizes), {"rows": rows, "before": args.before})


def table(rows: list[dict], sizes: list[int]) -> str:
    mib = 2**20
    lines = [
        f"train-ar on folders of 32 px images, features 8×8×256 ({FEATURE_BYTES // 1024} KiB "
        "fp32 per image); peak = VmHWM of each rank (rank 0 / rank 1), start = `--steps 1` "
        "from nothing, resume = `--steps 2` from its checkpoint, wall seconds incl. imports.",
        "",
        "| version | ranks | images | start (s) | resume (s) | peak MiB per rank "
        "| resume peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = " / ".join(f"{p / mib:.0f}" for p in r["peak_bytes"])
        rpeaks = " / ".join(f"{p / mib:.0f}" for p in r["resume_peak_bytes"])
        lines.append(f"| {r['version']} | {r['ranks']} | {r['images']} | {r['start_s']:.1f} | "
                     f"{r['resume_s']:.1f} | {peaks} | {rpeaks} |")  # fmt: skip
    lines += ["", "Growth of peak memory per extra image, in units of the fp32 feature bytes "
              f"({FEATURE_BYTES} B), from the smallest run to each larger one, and the peak "
              "projected from the largest run to ImageNet-1k (1,281,167 images; slopes under "
              "0.02, within the run-to-run noise of a few MiB per peak, count as flat):", "",
              "| version | ranks | images | growth rank 0 | growth rank 1 | projected "
              "ImageNet-1k peak GiB per rank |", "|---|---|---|---|---|---|"]  # fmt: skip
    find = {(r["version"], r["ranks"], r["images"]): r for r in rows}
    for version in ("before", "after"):
        for world in sorted({r["ranks"] for r in rows}):
            lo = find.get((version, world, min(sizes)))
            for n in sorted(sizes)[1:]:
                hi = find.get((version, world, n))
                if lo is None or hi is None:
                    continue
                extra = hi["images"] - lo["images"]
                slopes = [(b - a) / extra / FEATURE_BYTES
                          for a, b in zip(lo["peak_bytes"], hi["peak_bytes"])]  # fmt: skip
                proj = "-"
                if n == max(sizes):
                    grow = [s if s > 0.02 else 0.0 for s in slopes]
                    proj = " / ".join(f"{(b + g * FEATURE_BYTES * (1_281_167 - n)) / 2**30:.1f}"
                                      for b, g in zip(hi["peak_bytes"], grow))  # fmt: skip
                cells = [f"{s:.3f}" for s in slopes] + ["-"] * (2 - len(slopes))
                lines.append(f"| {version} | {world} | {min(sizes)} → {n} | {' | '.join(cells)} "
                             f"| {proj} |")  # fmt: skip
    lines += [
        "",
        "Wall times with nothing else running on the machine (1 rank: 2 threads; "
        "2 ranks: 1 thread each); about 5 s of each is importing torch.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
