"""rFID through torchmetrics' FrechetInceptionDistance, with Inception or any feature network.

Inception needs the optional torch-fidelity package plus its weights file on disk; nothing is
ever downloaded. A custom `feature_extractor` needs neither (torchmetrics only requires
torch-fidelity for its built-in Inception).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from rqgen.errors import CheckpointError, RqgenError
from rqgen.stage1.losses import find_weight_file, weight_search_dirs

# torch-fidelity's file; pytorch-fid ships the same TF-ported weights (same sha256 prefix).
INCEPTION_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


def find_inception_weights() -> Path | None:
    """The FID Inception weights in $RQGEN_WEIGHTS or the torch hub cache, if present."""
    return find_weight_file(INCEPTION_FILES)


def inception_fid_available() -> tuple[bool, str]:
    """(True, "") if Inception rFID can run offline, else (False, one-line reason and fix)."""
    missing = []
    if importlib.util.find_spec("torch_fidelity") is None:
        missing.append("the torch-fidelity package (pip install torch-fidelity)")
    if find_inception_weights() is None:
        where = ", ".join(str(d) for d in weight_search_dirs())
        missing.append(
            f"{INCEPTION_FILES[0]}, not found in [{where}] (download {INCEPTION_URL} into "
            "$RQGEN_WEIGHTS or the torch hub cache)"
        )
    if not missing:
        return True, ""
    return False, "Inception features (FID, rFID, IS) need " + " and ".join(missing)


class _Precomputed(nn.Module):
    """Identity 'extractor': FIDMeter computes features itself and hands them to torchmetrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


class FIDMeter:
    """Accumulates real/fake statistics of [-1,1] images and returns their Fréchet distance.

    With `feature_extractor` (any module mapping [-1,1] images (B,C,H,W) to (B,F) features),
    features are taken from it; otherwise the torch-fidelity InceptionV3 is built from local
    weights (`weights_path`, else searched). Statistics are kept in float64 by torchmetrics and
    summed over ranks on `compute()` under torch.distributed.
    """

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        weights_path: str | Path | None = None,
        reset_real_features: bool = True,
    ) -> None:
        self.extractor = feature_extractor
        self.reset_real_features = reset_real_features
        self._metric: FrechetInceptionDistance | None = None
        if feature_extractor is not None:
            feature_extractor.eval()
            self._dim: int | None = getattr(feature_extractor, "num_features", None)
            return
        if weights_path is None:
            ok, reason = inception_fid_available()
            if not ok:
                # the weights are the usual blocker (CheckpointError); the package alone is not
                missing_file = find_inception_weights() is None
                raise (CheckpointError if missing_file else RqgenError)(reason)
            weights_path = find_inception_weights()
        elif not Path(weights_path).is_file():
            raise CheckpointError(
                f"Inception weights {weights_path} not found; get {INCEPTION_URL}"
            )
        elif importlib.util.find_spec("torch_fidelity") is None:
            raise RqgenError("Inception features need torch-fidelity (pip install torch-fidelity)")
        # An explicit path makes torch-fidelity torch.load it instead of downloading.
        self._metric = FrechetInceptionDistance(
            feature=2048,
            reset_real_features=reset_real_features,
            feature_extractor_weights_path=str(weights_path),
        )
        self._dim = 2048

    @property
    def evaluator(self) -> str:
        """Human-readable name of the metric and its feature network, for reports."""
        base = "torchmetrics FrechetInceptionDistance"
        if self.extractor is None:
            return f"{base} (torch-fidelity InceptionV3 2015-12-05, 2048-d)"
        dim = "?" if self._dim is None else self._dim
        return f"{base} (custom features: {type(self.extractor).__name__}, {dim}-d)"

    def to(self, device: torch.device | str) -> FIDMeter:
        if self.extractor is not None:
            self.extractor.to(device)
        if self._metric is not None:
            self._metric.to(device)
        return self

    def _device(self) -> torch.device:
        module = self.extractor if self.extractor is not None else self._metric
        p = next(module.parameters(), None) if module is not None else None
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of [-1,1] images (B,3,H,W) to the real or the fake statistics."""
        images = images.to(self._device())
        if self.extractor is None:
            # torch-fidelity's Inception takes uint8 [0,255]; round (torchmetrics' own
            # normalize=True path truncates instead).
            u8 = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            self._metric.update(u8, real=real)
            return
        feats = self.extractor(images).flatten(1).double()
        if self._metric is None:
            # Built lazily: the feature size is only known once the extractor has run.
            self._dim = feats.shape[1]
            self._metric = FrechetInceptionDistance(
                feature=_Precomputed(self._dim), reset_real_features=self.reset_real_features
            ).to(feats.device)
        self._metric.update(feats, real=real)

    def compute(self) -> float:
        """FID between everything added as real and as fake (needs >= 2 images of each)."""
        if self._metric is None:
            raise RuntimeError("FIDMeter.compute() called before any update()")
        return float(self._metric.compute())

    def reset(self) -> None:
        """Forget fake statistics (and real ones too if reset_real_features)."""
        if self._metric is not None:
            self._metric.reset()
