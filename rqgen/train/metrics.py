"""What a run reports: JSONL metrics and TensorBoard scalars and images, on rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

try:  # a dependency, but a hand-made environment may lack it
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # pragma: no cover
    SummaryWriter = None


class MetricsLog:
    """OUT/metrics.jsonl and OUT/tensorboard, written by the main process only."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.tb = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(directory / "tensorboard"))

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One (3, H, W) image in [-1, 1] (e.g. a sample grid) for TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, (image.float().clamp(-1, 1) + 1) / 2, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
