"""A digit classifier trained on the real bundled digits: it scores generated digits
(accuracy against the requested class, Fréchet distance in its feature space) and serves as
the classifier of rejection sampling in the demo.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rqgen.checkpoint import load_state_dict_into, save_state_dict
from rqgen.data import BundledDigits
from rqgen.evaluate.fid import FIDMeter


class DigitClassifier(nn.Module):
    """Small CNN on 32 px digits in [-1, 1]; `features` is its 128-d penultimate layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.AvgPool2d(2),  # the digits carry 8×8 of information: 16 px is plenty
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, num_classes)
        self.num_features = 128

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitFeatures(nn.Module):
    """The classifier's penultimate features, as a module a FIDMeter can hold."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


def _shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random translations of up to 2 px: cheap augmentation against overfitting 1.5k digits."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_digit_classifier(
    steps: int = 300, seed: int = 0, device="cpu"
) -> tuple[DigitClassifier, float]:
    """Train on the bundled train split; returns the model and its held-out accuracy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    train = BundledDigits(32, "train")
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([train[i][1] for i in range(len(train))])
    model = DigitClassifier().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(model(_shift(x[idx], g).to(device)), y[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), heldout_accuracy(model)


@torch.no_grad()
def heldout_accuracy(model: DigitClassifier) -> float:
    """Accuracy on the bundled held-out digits (the split no model here trains on)."""
    val = BundledDigits(32, "val")
    device = next(model.parameters()).device
    xv = torch.stack([val[i][0] for i in range(len(val))]).to(device)
    yv = torch.tensor([val[i][1] for i in range(len(val))], device=device)
    return float((model.eval()(xv).argmax(1) == yv).float().mean())


def load_or_train(cache: str | Path, device="cpu", steps: int = 300) -> DigitClassifier:
    """The classifier from `cache/digit_classifier.safetensors`, trained once if missing."""
    path = Path(cache) / "digit_classifier.safetensors"
    model = DigitClassifier()
    if path.is_file():
        load_state_dict_into(model, path)
    else:
        model, _ = train_digit_classifier(steps, device=device)
        save_state_dict(model.state_dict(), path)
    return model.to(device).eval()


@torch.no_grad()
def score_digits(
    classifier: DigitClassifier, samples: Tensor, requested: Tensor, reference: Tensor
) -> dict[str, float]:
    """Accuracy of the requested classes, and the Fréchet distance to `reference` digits in
    the classifier's feature space."""
    classifier.eval()
    acc = float((classifier(samples).argmax(1) == requested).float().mean())
    fid = FIDMeter(feature_extractor=DigitFeatures(classifier))
    fid.update(reference, real=True)
    fid.update(samples, real=False)
    return {"accuracy": acc, "frechet_distance": fid.compute(), "evaluator": fid.evaluator}
