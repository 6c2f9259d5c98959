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
