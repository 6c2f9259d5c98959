"""PSNR/SSIM, codebook statistics and the FID meter (with a small custom feature network)."""

import importlib.util
import math

import pytest
import torch
from torch import nn

from rqgen.errors import CheckpointError
from rqgen.evaluate import (
    CodeStats,
    FIDMeter,
    find_inception_weights,
    inception_fid_available,
    psnr,
    ssim,
)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-ish images in [-0.8, 0.8]: upsampled noise, so SSIM's windows see structure."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    up = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return up * 1.6 - 0.8


def test_psnr_identical_is_capped_and_offset_is_20db():
    x = smooth_images(4)
    assert torch.equal(psnr(x, x), torch.full((4,), 100.0))
    # +0.2 on [-1,1] is +0.1 on [0,1]: mse 0.01 -> 20 dB (x stays inside the clamp range)
    p = psnr(x, x + 0.2)
    assert p.shape == (4,) and torch.allclose(p, torch.full((4,), 20.0), atol=1e-3)
    assert psnr(x, x + 0.4).max() < p.min()


def test_ssim_identical_is_one_and_decreases_with_noise():
    x = smooth_images(3)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s = [ssim(x, x + a * noise) for a in (0.02, 0.1, 0.3)]
    assert s[0].shape == (3,)
    assert bool((s[0] > s[1]).all() and (s[1] > s[2]).all() and (s[0] < 1).all())


def test_codestats_uniform_codes():
    stats = CodeStats(16, depth_axis=None)
    stats.update(torch.arange(4).repeat(5, 3))  # codes 0..3, 15 times each
    stats.update(torch.tensor([[0, 1], [2, 3]]))  # accumulates, stays uniform
    assert stats.usage() == 0.25
    assert stats.perplexity() == pytest.approx(4.0)
    single = CodeStats(8, depth_axis=None)
    single.update(torch.full((10,), 5))
    assert single.perplexity() == pytest.approx(1.0) and single.usage() == 1 / 8
    with pytest.raises(ValueError, match="no per-depth"):
        single.perplexity(per_depth=True)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        single.update(torch.tensor([8]))


def test_codestats_per_depth():
    # (B,H,W,D=2): depth 0 always code 0, depth 1 uniform over codes 8..15
    codes = torch.zeros(2, 4, 4, 2, dtype=torch.long)
    codes[..., 1] = (torch.arange(32) % 8 + 8).view(2, 4, 4)
    stats = CodeStats(16)
    stats.update(codes)
    assert stats.perplexity(per_depth=True) == pytest.approx([1.0, 8.0])
    assert stats.usage(per_depth=True) == [1 / 16, 8 / 16]
    # pooled: p(0) = 1/2, eight codes at 1/16 -> entropy 2.5 ln 2
    assert stats.perplexity() == pytest.approx(2**2.5)
    assert stats.usage() == 9 / 16
    summary = stats.summary()
    assert summary["perplexity_d1"] == pytest.approx(8.0) and "usage_d0" in summary
    with pytest.raises(ValueError, match="depth changed"):
        stats.update(torch.zeros(2, 3, dtype=torch.long))
    assert stats.usage() == 9 / 16  # a rejected batch leaves the counts untouched


class TinyFeatures(nn.Module):
    """Fixed random conv net, 16-d features: stands in for Inception in tests."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_fid_custom_features_self_zero_and_monotone_in_noise():
    x = smooth_images(96, size=16)
    extractor = TinyFeatures()
    meter = FIDMeter(extractor, reset_real_features=False)
    assert meter.evaluator.endswith("(custom features: TinyFeatures, ?-d)")
    for half in x.chunk(2):  # several batches accumulate
        meter.update(half, real=True)
    meter.update(x, real=False)
    assert meter.evaluator.endswith("(custom features: TinyFeatures, 16-d)")
    scale = extractor(x).var(dim=0).sum().item()  # total feature variance, the FID scale
    self_fid = meter.compute()
    assert abs(self_fid) < 1e-3 * scale

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    fids = []
    for a in (0.05, 0.1, 0.2, 0.4):
        meter.reset()  # drops fake statistics only (reset_real_features=False)
        meter.update(x + a * noise, real=False)
        fids.append(meter.compute())
    assert abs(self_fid) < 1e-3 * fids[0] and fids[0] < fids[1] < fids[2] < fids[3]


def test_fid_needs_updates():
    meter = FIDMeter(TinyFeatures())
    with pytest.raises(RuntimeError, match="before any update"):
        meter.compute()


def test_inception_unavailable_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RQGEN_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert find_inception_weights() is None
    ok, reason = inception_fid_available()
    assert not ok and "weights-inception-2015-12-05-6726825d.pth" in reason and "\n" not in reason
    with pytest.raises(CheckpointError, match="weights-inception-2015-12-05-6726825d.pth"):
        FIDMeter()


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="installed")
def test_inception_weights_found_but_package_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("RQGEN_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")  # pytorch-fid name
    assert find_inception_weights() == tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    ok, reason = inception_fid_available()
    assert not ok and "torch-fidelity" in reason and "weights-inception" not in reason


def test_psnr_matches_formula_on_random_images():
    x, y = smooth_images(2, seed=1), smooth_images(2, seed=2)
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(1 / mse), atol=1e-4)
    assert not math.isinf(psnr(x, x)[0].item())


def test_coarse_to_fine_strip_error_row_shrinks_with_the_error():
    """The strip's lower row is |x - decoding| magnified: black for the input itself, and
    brighter for a worse decoding (what makes sub-visible refinements show)."""
    import numpy as np

    from rqgen.evaluate.vae import ERROR_GAIN, coarse_to_fine_strip

    x = smooth_images(1)[0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    partials = [x + 0.2 * noise, x + 0.05 * noise, x]  # coarse to fine
    strip = np.asarray(coarse_to_fine_strip(x, partials, upscale=1)).astype(float)
    top_h = strip.shape[0] // 2
    lower = strip[top_h:]
    # each row: a 14-pixel caption band, then the grid with 2 pixels of padding around panels
    panels = [lower[16:48, 2 + i * 34 : 2 + i * 34 + 32] for i in range(4)]
    means = [p.mean() for p in panels]
    assert means[0] == 0 and means[3] == 0  # the input and the exact decoding
    assert means[1] > means[2] > 0
    expected = (0.2 * noise).abs().div(2).mul(ERROR_GAIN).clamp(0, 1).mean() * 255
    assert abs(means[1] - float(expected)) < 2  # magnified by ERROR_GAIN, no other scaling
