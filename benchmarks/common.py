"""Shared by the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_results(name: str, markdown_body: str, data: dict) -> Path:
    """benchmarks/results/NAME.md (table + machine + command) and NAME.json (raw numbers)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine(),
        "command": command(),
        "date": datetime.now(timezone.utc).isoformat(),
    }
    m = meta["machine"]
    header = (
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}"
        + (f", GPU {m['cuda']}" if m["cuda"] else ", no GPU")
        + f"\n\nCommand: `{meta['command']}`\n\nDate: {meta['date'][:19]}Z\n\n"
    )
    md = RESULTS / f"{name}.md"
    md.write_text(header + markdown_body.rstrip() + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **data}, indent=2) + "\n")
    return md


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from statistics import mean, stdev

    from scipy.stats import t

    n = len(values)
    if n < 2:
        return mean(values), 0.0
    return mean(values), float(t.ppf(0.975, n - 1)) * stdev(values) / n**0.5


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle_boot"]  # fmt: skip


def fashion_mnist(root: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """Folders of PNGs (one subfolder per class) from Debian's Fashion-MNIST: the first
    `n_train` training images and the first `n_val` test images, which no training sees.
    Installs the package with apt-get when it is missing and we may."""
    import gzip
    import subprocess

    import numpy as np
    from PIL import Image

    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        if os.geteuid() != 0:
            sys.exit("Fashion-MNIST is missing: run `sudo apt-get install dataset-fashion-mnist`")
        cmd = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)

    def read(kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        with gzip.open(FASHION_MNIST / f"{kind}-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        with gzip.open(FASHION_MNIST / f"{kind}-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
        return images, labels

    out = []
    for kind, split, n in (("train", "train", n_train), ("t10k", "val", n_val)):
        folder = root / f"{split}{n}"
        if not (folder / ".complete").is_file():  # written last: a half-made folder is redone
            images, labels = read(kind, n)
            for c in FASHION_CLASSES:
                (folder / c).mkdir(parents=True, exist_ok=True)
            for i, (img, y) in enumerate(zip(images, labels)):
                Image.fromarray(img).save(folder / FASHION_CLASSES[y] / f"{i:05d}.png")
            (folder / ".complete").touch()
        out.append(folder)
    return out[0], out[1]
