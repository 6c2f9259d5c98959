"""refit-codebook: a new quantizer fit to a trained RQ-VAE's latents, autoencoder unchanged."""

import pytest
import torch
from test_rqvae import small_config

from rqgen import RQVAE
from rqgen.cli import main
from rqgen.data import build_dataset
from rqgen.errors import ConfigError
from rqgen.train.refit import refit_codebook


def latent_error(vae: RQVAE, x: torch.Tensor) -> float:
    """Mean ||z - Ẑ||² of vae's own codes on x."""
    with torch.no_grad():
        z = vae.encode(x)
        return float((z - vae.quantizer.decode_codes(vae.quantizer.quantize(z)[0])).pow(2).mean())


def test_a_shared_scaled_codebook_is_fit_to_a_separate_models_latents(tmp_path, capsys):
    torch.manual_seed(0)
    source = RQVAE(small_config(code_depth=2, shared_codebook=False)).eval()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    shared = dict(shared_codebook=True, depth_scale=True)
    init_only = refit_codebook(source, "bundled:digits", shared, 1, 16, progress=False, refine=0)
    fit = refit_codebook(source, "bundled:digits", shared, 30, 16, progress=False, refine=0)
    refined = refit_codebook(source, "bundled:digits", shared, 30, 16, progress=False, refine=3)
    q = fit.quantizer
    assert q.shared_codebook and q.depth_scale and q.num_codebooks == 1 and not q.training
    for k, v in source.state_dict().items():  # the source is untouched ...
        assert torch.equal(v, before[k]), k
        if not k.startswith("quantizer."):  # ... and its autoencoder copied exactly
            assert torch.equal(fit.state_dict()[k], v), k
    digits = build_dataset("bundled:digits", 32, "train")
    x = torch.stack([digits[i][0] for i in range(64)])
    assert latent_error(fit, x) < 0.9 * latent_error(init_only, x)  # the EMA learned
    assert latent_error(refined, x) < latent_error(fit, x)  # and least squares went further
    with pytest.raises(ConfigError, match="model.ch is not a quantizer setting"):
        refit_codebook(source, "bundled:digits", {"ch": 32}, 1, 16, progress=False)

    source.save_pretrained(tmp_path / "src")  # the command: another K, scored where it went
    argv = ["refit-codebook", "--vae", str(tmp_path / "src"), "--data", "bundled:digits",
            "--out", str(tmp_path / "k16"), "--steps", "2", "--batch-size", "16",
            "--device", "cpu", "model.codebook_size=16"]  # fmt: skip
    assert main(argv) == 0 and "K=16, D=2" in capsys.readouterr().out
    assert RQVAE.from_pretrained(tmp_path / "k16").quantizer.codebook.shape == (2, 16, 16)
    assert main([*argv[:-1], "train.lr=1"]) == 2
    assert "is not model.key=value" in capsys.readouterr().err
    assert main(argv) == 2  # never over a model already there (the source included)
    assert "exists and is not empty" in capsys.readouterr().err


def test_refine_is_a_lloyd_step_at_depth_1_and_lowers_the_final_error_deeper():
    from rqgen.quantize.residual import ResidualQuantizer

    torch.manual_seed(0)
    z = torch.randn(4000, 8) * torch.linspace(0.2, 2.0, 8)
    one = ResidualQuantizer(8, 16, 1).train()
    one(z)  # data init + one EMA step
    codes = one.quantize(z)[0][:, 0]
    one.refine(z, 1)  # D = 1: least squares on fixed codes = each code the mean of its vectors
    for k in codes.unique():
        assert torch.allclose(one.codebook[0, k], z[codes == k].mean(0), atol=5e-3)
    for kw in (dict(depth_scale=True), dict(shared_codebook=False)):
        q = ResidualQuantizer(8, 16, 3, **kw).train()
        for _ in range(20):
            q(z)
        err = [float((z - q.decode_codes(q.quantize(z)[0])).pow(2).mean())]
        q.refine(z, 3)
        err.append(float((z - q.decode_codes(q.quantize(z)[0])).pow(2).mean()))
        assert err[1] < 0.97 * err[0], (kw, err)  # the final error, not each depth's
