"""The feature networks generation metrics are computed in (rqgen/evaluate/stats.py holds
the statistics and the scores).

An `Evaluator` maps [-1, 1] images, in one forward pass, to pooled features (FID, KID,
precision/recall), spatial features (sFID: the first 7 channels of a mid-level map,
flattened as (H, W, C)) and class logits computed from the pooled features (IS):
`inception` is torch-fidelity's InceptionV3 (2015-12-05 weights, from a local file; the
network behind most published FIDs; spatial: mixed_6/conv, i.e. Mixed_6d's 1×1 branch, as
the ADM evaluator reads it), `digits` is the digit classifier trained on the bundled digits
(runs anywhere, meaningful only for digits; spatial: its second convolution's 8×8 map).
Any module can stand in (tests use small ones).

Reference statistics are saved as `.npz` (`rqgen fid-stats`) with the evaluator's name, and a
comparison between different evaluators is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.errors import CheckpointError, ConfigError, DataError
from rqgen.evaluate.digits import DigitFeatures, load_or_train
from rqgen.evaluate.fid import find_inception_weights, inception_fid_available
from rqgen.utils.paths import cache_dir

SPATIAL_CHANNELS = 7  # ADM's sFID: spatial[..., :7]
INCEPTION_NAMES = {
    "fd": "fid",
    "sfd": "sfid",
    "kd": "kid",
    "is": "inception_score",
    "precision": "precision",
    "recall": "recall",
    "label": "FID",
}


class Evaluator(nn.Module):
    """outputs(images) -> {"pool": (B, F), "spatial": (B, S), "logits": (B, classes)} in one
    pass of `features`; `head` maps pooled features to logits, `spatial` is a submodule of
    `features` whose (B, C, H, W) output is read on the way."""

    def __init__(
        self,
        name: str,
        features: nn.Module,
        head: nn.Module | None = None,
        input_size: int | None = None,
        short: str = "",
        spatial: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.name, self.feature_net, self.head = name, features.eval(), head
        self.input_size = input_size  # resize to this many pixels first (None: as given)
        self.short = short  # inception, digits: names the scores
        self._seen: list[Tensor] = []
        self.has_spatial = spatial is not None
        if spatial is not None:
            spatial.register_forward_hook(lambda _m, _i, out: self._seen.append(out))

    def score_names(self) -> dict[str, str]:
        """Result keys: the standard FID / sFID / KID / IS / precision / recall only for
        Inception features; in another network's feature space the same formulas get that
        network's name (fd_digits ...), so that no one quotes a digit-classifier distance
        as an FID."""
        if self.short == "inception":
            return dict(INCEPTION_NAMES)
        s = self.short or "features"
        return {**{k: f"{k}_{s}" for k in INCEPTION_NAMES if k != "label"}, "label": f"FD({s})"}

    @property
    def has_logits(self) -> bool:
        return self.head is not None

    def _prepare(self, images: Tensor) -> Tensor:
        p = next(self.parameters(), None)
        images = images.to(p.device if p is not None else "cpu", torch.float32)
        if self.input_size and images.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return images

    @torch.no_grad()
    def outputs(self, images: Tensor, with_logits: bool = True) -> dict[str, Tensor]:
        self._seen.clear()
        pool = self.feature_net(self._prepare(images)).flatten(1)
        out = {"pool": pool.double()}
        if self._seen:
            m = self._seen.pop()[:, :SPATIAL_CHANNELS]
            out["spatial"] = m.permute(0, 2, 3, 1).flatten(1).double()  # TF's NHWC order
        if with_logits and self.head is not None:
            out["logits"] = self.head(pool.float()).double()
        return out

    def features(self, images: Tensor) -> Tensor:
        return self.outputs(images, with_logits=False)["pool"]

    def logits(self, images: Tensor) -> Tensor:
        return self.outputs(images)["logits"]


class _Uint8(nn.Module):
    """[-1, 1] -> uint8 [0, 255] (rounded) -> torch-fidelity's InceptionV3 (pool3)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))[0]


class _Unbiased(nn.Module):
    """Inception's 1008-way logits without the bias (torch-fidelity's logits_unbiased, the
    ADM evaluator's softmax input): pool3 @ fc.weight.T."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, pool: Tensor) -> Tensor:
        return pool @ self.fc.weight.T


def build_evaluator(name: str, device="cpu", cache: str | Path | None = None) -> Evaluator:
    """`inception` (local torch-fidelity weights) or `digits` (the bundled-digits CNN)."""
    if name == "digits":
        clf = load_or_train(Path(cache or cache_dir()) / "classifiers", device)
        name = "digits-cnn (rqgen bundled-digits classifier, 128-d)"
        return Evaluator(name, DigitFeatures(clf), clf.head, 32, "digits", clf.body[5]).to(device)
    if name == "inception":
        from torchmetrics.image.fid import NoTrainInceptionV3

        ok, reason = inception_fid_available()
        if not ok:
            raise CheckpointError(reason)
        net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(find_inception_weights()))
        return inception_evaluator(net).to(device)
    raise ConfigError(f"unknown evaluator {name!r}: use inception or digits")


def inception_evaluator(net: nn.Module) -> Evaluator:
    """An Evaluator on torch-fidelity's FeatureExtractorInceptionV3 layout (any weights)."""
    return Evaluator(
        "torch-fidelity InceptionV3 2015-12-05 (pool3 2048-d)",
        _Uint8(net),
        _Unbiased(net.fc),
        short="inception",
        spatial=net.Mixed_6d.branch1x1,
    )


def digits_like(images: Tensor) -> float:
    """Fraction of images (B, 3, H, W) in [-1, 1] that look like the bundled digits: grey
    (channels within 0.05 of their mean on average) and mostly dark (median below 0.35 of
    full brightness), as white strokes on black are."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    grey = (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3)) < 0.05
    dark = x.flatten(1).median(1).values < 0.35
    return float((grey & dark).float().mean())


def check_digits_like(batches: Iterable[Tensor], what: str, look: int = 64):
    """Pass batches through; refuse in one line when the first `look` images are mostly not
    digit-like, since a digit classifier's features say nothing about other pictures."""
    batches = iter(batches)
    head, n = [], 0
    for batch in batches:
        head.append(batch)
        n += len(batch)
        if n >= look:
            break
    frac = digits_like(torch.cat(head)[:look]) if head else 1.0
    if frac < 0.5:
        raise DataError(
            f"--features digits scores pictures with a classifier of white-on-black digits, but "
            f"only {frac:.0%} of the first images of {what} look like that: its distances would "
            "mean nothing there; use --features inception"
        )
    yield from head
    yield from batches
