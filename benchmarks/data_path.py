"""Seconds per tiny32 training step on a folder of large photos (raw, prepared on first use,
prepared ahead) against the bundled 32 px data, and the loader/thread defaults.

The folder mimics a user's wallpapers: the 4096×4096 WebP wallpapers of Debian's
gnome-backgrounds (installed with apt-get when missing and possible), plus JPEGs at
5120×2880 and PNGs at 3840×2160 made by enlarging scikit-image's photos: 58 files in all.

    python benchmarks/data_path.py [--steps 8] [--folder DIR]

Each setting runs `python -m rqgen train-vae --config tiny32` for --steps steps (log every
step) and reports the median of `sec_per_step` after the first two steps; preparation time
is reported on its own. Results: benchmarks/results/data_path.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_folder(folder: Path) -> Path:
    """58 large images: wallpapers (WebP) and enlarged photos (JPEG, PNG)."""
    from PIL import Image
    from skimage import data as skdata

    if folder.is_dir() and len(list(folder.iterdir())) >= 58:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    walls = Path("/usr/share/backgrounds/gnome")
    if not walls.is_dir() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "gnome-backgrounds"], check=False,
                       capture_output=True)  # fmt: skip
    n = 0
    for p in sorted(walls.glob("*.webp")) if walls.is_dir() else []:
        with Image.open(p) as img:
            if min(img.size) >= 2048:
                shutil.copy(p, folder / p.name)
                n += 1
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
             "hubble_deep_field")  # fmt: skip
    photos = [getattr(skdata, name)() for name in names]
    i = 0
    while n < 58:
        arr = photos[i % len(photos)]
        img = Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, -1)).convert("RGB")
        if i % 2 == 0:
            img.resize((5120, 2880), Image.Resampling.BICUBIC).save(folder / f"p{i}.jpg",
                                                                     quality=92)  # fmt: skip
        else:
            img.resize((3840, 2160), Image.Resampling.BICUBIC).save(folder / f"p{i}.png")
        i, n = i + 1, n + 1
    return folder


def steps(data: str, out: Path, n: int, *overrides: str, env: dict | None = None) -> dict:
    """Run n steps; median seconds per step after the first two, and the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "rqgen", "train-vae", "--data", data, "--out", str(out),
           "--steps", str(n), "--config", "tiny32", "--device", "cpu", "train.log_every=1",
           "train.ckpt_every=100000", "train.sample_every=100000", *overrides]  # fmt: skip
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.time() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per = [x["sec_per_step"] for x in rows if "sec_per_step" in x][2:]
    line = next((x for x in r.stdout.splitlines() if "loader worker" in x), "")
    return {"s_per_step": float(np.median(per)), "wall_s": wall, "n": n, "line": line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--raw-steps", type=int, default=4, help="steps on undecoded large files")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "rqgen-wallpapers"))
    args = ap.parse_args()
    folder = build_folder(Path(args.folder))
    work = Path(tempfile.mkdtemp(prefix="rqgen-data-path-"))
    cache = {"RQGEN_CACHE": str(work / "cache")}
    no_omp = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    os.environ.clear()
    os.environ.update(no_omp)
    rows = []

    def add(name, result):
        rows.append((name, result))
        print(f"{name}: {result['s_per_step']:.3f} s/step  ({result['line'].strip()[-60:]})",
              flush=True)  # fmt: skip

    add("bundled:photos, defaults (auto workers/threads)",
        steps("bundled:photos", work / "a", args.steps, env=cache))  # fmt: skip
    old = steps("bundled:photos", work / "b", args.steps, "train.num_workers=2", env=cache)
    add("bundled:photos, train.num_workers=2 (the old tiny32 default; 1 thread left)", old)
    add(f"{len(list(folder.iterdir()))} large photos, raw (RQGEN_AUTO_PREPARE=0)",
        steps(str(folder), work / "c", args.raw_steps,
              env={**cache, "RQGEN_AUTO_PREPARE": "0"}))  # fmt: skip
    t0 = time.time()
    first = steps(str(folder), work / "d", args.steps, env=cache)  # prepares into the cache
    add("large photos, prepared into the cache on first use", first)
    t_first = time.time() - t0
    prep = work / "prepared"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "rqgen", "prepare", "--data", str(folder), "--out",
                    str(prep), "--resolution", "32"], check=True, capture_output=True)  # fmt: skip
    t_prepare = time.time() - t0
    add("large photos, rqgen prepare ahead", steps(str(prep), work / "e", args.steps, env=cache))
    write(rows, t_prepare, t_first, folder, args)
    shutil.rmtree(work, ignore_errors=True)


def write(rows, t_prepare, t_first, folder, args) -> None:
    load = os.getloadavg()[0]
    out = ROOT / "benchmarks" / "results" / "data_path.md"
    lines = [
        "# Data path: seconds per tiny32 step",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch CPU; load average {load:.2f} at the end. Command: `python "
        f"benchmarks/data_path.py --steps {args.steps} --raw-steps {args.raw_steps}`.",
        f"Folder: {len(list(folder.iterdir()))} files (gnome-backgrounds 4096×4096 WebP "
        "wallpapers, JPEG 5120×2880 and PNG 3840×2160 enlarged photos).",
        "",
        "| data | s / step (median after 2 steps) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {r['s_per_step']:.3f} |" for name, r in rows]
    lines += [
        "",
        f"`rqgen prepare --resolution 32` on the folder: {t_prepare:.1f} s (once). The first "
        f"training run on the raw folder, which prepares it into the cache itself, took "
        f"{t_first:.1f} s in all for {args.steps} steps.",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
