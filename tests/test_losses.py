"""LPIPS (random and file-loaded weights), PatchGAN discriminator and GAN loss helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from rqgen.errors import CheckpointError
from rqgen.stage1 import losses
from rqgen.stage1.losses import (
    LPIPS,
    NLayerDiscriminator,
    adaptive_weight,
    adopt_weight,
    generator_adv_loss,
    hinge_d_loss,
)


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 32, 32, generator=g) * 1.6 - 0.8


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Fake vgg16-397923af.pth / vgg.pth with random weights of the right shapes."""
    d = tmp_path_factory.mktemp("weights")
    g = torch.Generator().manual_seed(2)
    vgg = {
        f"features.{k}": torch.randn(v.shape, generator=g) * 0.05
        for k, v in LPIPS().features.state_dict().items()
    }
    vgg["classifier.0.weight"] = torch.zeros(4, 2)  # torchvision file has these; must be ignored
    lin = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(vgg, d / "vgg16-397923af.pth")
    torch.save(lin, d / "vgg.pth")
    return d, vgg, lin


@pytest.fixture
def no_weight_dirs(tmp_path, monkeypatch):
    """Point every search location at empty temp dirs."""
    monkeypatch.setenv("RQGEN_WEIGHTS", str(tmp_path / "rq"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(losses, "_lpips_package_dirs", lambda: [])
    return tmp_path


def test_lpips_zero_on_identical_and_symmetric(lpips, images):
    noisy = images + 0.2 * torch.randn_like(images)
    assert torch.allclose(lpips(images, images), torch.zeros(3), atol=1e-7)
    d_xy, d_yx = lpips(images, noisy), lpips(noisy, images)
    assert d_xy.shape == (3,)
    assert torch.allclose(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    assert torch.isclose(lpips(images, noisy, reduction="mean"), d_xy.mean())


def test_lpips_grows_with_noise(lpips, images):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    d = [lpips(images, images + s * noise).mean().item() for s in (0.02, 0.1, 0.3, 0.8)]
    assert 0 < d[0] < d[1] < d[2] < d[3]


def test_lpips_frozen_but_input_gets_gradient(lpips, images):
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert all(not p.requires_grad for p in lpips.parameters())
    x = (images + 0.1).requires_grad_(True)
    lpips(x, images).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_loads_from_rqgen_weights(weight_files, no_weight_dirs, monkeypatch, images):
    d, vgg, lin = weight_files
    monkeypatch.setenv("RQGEN_WEIGHTS", str(d))
    model = LPIPS.from_pretrained()
    assert torch.equal(model.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(model.heads[4].weight, lin["lin4.model.1.weight"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model(images, images + 0.1).min() > 0


def test_lpips_loads_from_torch_hub_cache(weight_files, no_weight_dirs, monkeypatch):
    d, vgg, _ = weight_files
    ckpt = no_weight_dirs / "th" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    for name in ("vgg16-397923af.pth", "vgg.pth"):
        (ckpt / name).symlink_to(d / name)
    model = LPIPS.from_pretrained()
    assert torch.equal(model.features[0].bias, vgg["features.0.bias"])


def test_lpips_missing_files_name_the_file(weight_files, no_weight_dirs):
    with pytest.raises(CheckpointError) as e:
        LPIPS.from_pretrained()
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and "perceptual_weight=0" in msg and "\n" not in msg
    assert str(no_weight_dirs / "rq") in msg  # says where it looked
    d, _, _ = weight_files
    with pytest.raises(CheckpointError, match=r"vgg\.pth"):  # heads missing, VGG given
        LPIPS.from_pretrained(vgg_path=d / "vgg16-397923af.pth")
    with pytest.raises(CheckpointError, match="nope.pth"):
        LPIPS.from_pretrained(vgg_path=no_weight_dirs / "nope.pth", lin_path=d / "vgg.pth")


def test_lpips_rejects_wrong_files(weight_files, tmp_path):
    d, _, lin = weight_files
    bad = dict(lin, **{"lin2.model.1.weight": torch.rand(1, 32, 1, 1)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"lin2\.model\.1\.weight has shape \(1, 32, 1, 1\)"):
        LPIPS.from_pretrained(d / "vgg16-397923af.pth", tmp_path / "bad.pth")
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        LPIPS.from_pretrained(d / "vgg16-397923af.pth", tmp_path / "short.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        LPIPS.from_pretrained(tmp_path / "junk.pth", d / "vgg.pth")


@pytest.mark.parametrize(("n_layers", "size", "out"), [(2, 32, 6), (2, 256, 62), (3, 256, 30)])
def test_discriminator_patch_shape(n_layers, size, out):
    disc = NLayerDiscriminator(n_layers=n_layers, ndf=16 if size > 32 else 64)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_discriminator_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 4 and len(bns) == 2
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 1e-3
    assert all(c.bias is None for c in convs[1:-1])  # bias is redundant before BatchNorm
    assert abs(bns[0].weight.mean().item() - 1) < 0.01 and bns[0].bias.abs().sum() == 0
    plain = NLayerDiscriminator(use_batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())


def test_hinge_and_generator_losses():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0
    assert generator_adv_loss(fake).item() == pytest.approx(1 / 3)  # -mean([-2, 0, 1])


def test_adaptive_weight_matches_hand_computation():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    rec = ((w * x) ** 2).sum()  # d/dw = 2 w x^2 = [18, 64]
    g = -(w * x).sum()  # d/dw = -x = [-3, -4], norm 5
    lam = adaptive_weight(rec, g, w)
    assert lam.item() == pytest.approx(math.sqrt(18**2 + 64**2) / (5 + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    (rec + lam * g).backward()  # graph was retained for the real backward pass
    assert torch.allclose(w.grad, torch.tensor([18.0, 64.0]) - lam * x)
    w2 = torch.tensor([1.0], requires_grad=True)
    capped = adaptive_weight((w2 * 1e3).sum(), (w2 * 0).sum(), w2, max_weight=50.0)
    assert capped.item() == 50.0


def test_adopt_weight():
    assert adopt_weight(0.8, step=9, start=10) == 0.0
    assert adopt_weight(0.8, step=10, start=10) == 0.8
    assert adopt_weight(0.8, step=0, start=0) == 0.8


def test_stage1_loss_composes_eq_6_7_and_the_weighted_terms():
    from types import SimpleNamespace

    from rqgen.stage1.losses import Stage1Loss

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    last = torch.nn.Parameter(torch.ones(3))
    out = SimpleNamespace(reconstruction=x * last[None, :, None, None] * 0.5,
                          commitment_loss=torch.tensor(0.3))  # fmt: skip
    loss, parts = Stage1Loss(0.0, 0.0, None, None)(x, out, last, adversarial=False)
    torch.testing.assert_close(loss, F.mse_loss(out.reconstruction, x) + 0.3)
    assert set(parts) == {"rec", "commit", "loss"}
    # DQ-VAE: its router's budget loss is added and the fine fraction reported
    dq = SimpleNamespace(**vars(out), budget_loss=torch.tensor(0.2), fine_mask=torch.ones(2, 4))
    loss_dq, parts = Stage1Loss(0.0, 0.0, None, None)(x, dq, last, adversarial=False)
    torch.testing.assert_close(loss_dq, loss + 0.2)
    assert parts["fine_fraction"] == 1
    # adversarial: + w·λ·L_G, the discriminator frozen for the generator's gradients
    disc = NLayerDiscriminator(3, 8, 2)
    composed = Stage1Loss(0.0, 0.5, None, disc)
    loss_g, parts = composed(x, out, last, adversarial=True)
    g = generator_adv_loss(disc(out.reconstruction))
    torch.testing.assert_close(loss_g, loss + parts["adaptive_w"] * g)
    assert parts["adaptive_w"] == pytest.approx(
        0.5 * float(adaptive_weight(F.mse_loss(out.reconstruction, x), g, last))
    )
    loss_g.backward()
    assert all(p.grad is None for p in disc.parameters()) and last.grad is not None
    d = composed.discriminator_loss(disc, x, out.reconstruction)
    torch.testing.assert_close(d, hinge_d_loss(disc(x), disc(out.reconstruction.detach())))
    assert all(p.requires_grad for p in disc.parameters())  # trainable again
