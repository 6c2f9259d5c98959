"""The digit classifier that scores generated digits: it must actually recognise digits."""

import torch

from rqgen.data import BundledDigits
from rqgen.evaluate.digits import load_or_train, score_digits, train_digit_classifier


def test_classifier_learns_and_scores(tmp_path):
    model, acc = train_digit_classifier(steps=150)
    assert acc > 0.9, acc
    val = BundledDigits(32, "val")
    x = torch.stack([val[i][0] for i in range(100)])
    y = torch.tensor([val[i][1] for i in range(100)])
    real = score_digits(model, x, y, reference=x)
    assert real["accuracy"] > 0.9 and abs(real["frechet_distance"]) < 1e-3
    noisy = score_digits(model, (x + 0.8 * torch.randn_like(x)).clamp(-1, 1), y, reference=x)
    assert noisy["frechet_distance"] > 10 * max(real["frechet_distance"], 1e-3)
    assert "DigitFeatures" in real["evaluator"]
    # cached: the second load reads the file instead of training
    a = load_or_train(tmp_path, steps=5)
    assert (tmp_path / "digit_classifier.safetensors").is_file()
    b = load_or_train(tmp_path, steps=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
