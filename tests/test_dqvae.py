"""DQ-VAE: code-map invariants, region weighting, router gradients, learning, CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from rqgen import DQVAE, DQVAEConfig, ResidualQuantizer
from rqgen.data import BundledDigits
from rqgen.errors import ConfigError
from rqgen.evaluate import psnr
from rqgen.stage1.dqvae import pack_codes, unpack_codes

TINY = dict(resolution=32, ch=8, ch_mult=[1, 2, 2, 2], decoder_ch_mult=[1, 2, 2],
            num_res_blocks=1, attn_resolutions=[], decoder_attn_resolutions=[],
            z_channels=16, embed_dim=16, codebook_size=64)  # fmt: skip


def digits(n: int, split: str = "train") -> torch.Tensor:
    data = BundledDigits(32, split)
    return torch.stack([data[i][0] for i in range(n)])


def fitted(router: str = "entropy", **kw) -> DQVAE:
    torch.manual_seed(0)
    model = DQVAE(DQVAEConfig(**{**TINY, "router": router, **kw}))
    if router == "entropy":
        model.fit_router([digits(256)])
    return model


def test_code_map_invariants_and_decode_round_trip():
    model = fitted().eval()
    x = digits(16, "val")
    packed = model.encode_to_codes(x)
    assert packed.shape == (16, 8, 8, 2)
    codes, fine = unpack_codes(packed)
    assert torch.equal(pack_codes(codes, fine), packed)
    # a coarse region carries one code: its four fine cells hold the same id
    blocks = codes.view(16, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(16, 4, 4, 4)
    same = (blocks == blocks[..., :1]).all(-1)
    assert same[~fine].all()
    n_fine = fine.flatten(1).sum(1)
    assert torch.equal(model.tokens_per_image(packed), (16 - n_fine) + 4 * n_fine)
    # the codes decode to exactly what the eval forward pass reconstructs
    out = model(x)
    assert torch.equal(out.codes, packed)
    torch.testing.assert_close(model.decode_codes(packed), out.reconstruction)


def test_entropy_router_follows_the_target_fraction():
    for r in (0.25, 0.75):
        model = fitted(fine_fraction=r).eval()
        frac = float(unpack_codes(model.encode_to_codes(digits(269, "val")))[1].float().mean())
        assert abs(frac - r) < 0.06


def test_coarse_copies_weigh_one_quarter_like_one_vector():
    """Four copies at weight 1/4 update the codebook and commit exactly like one copy."""
    torch.manual_seed(0)
    a, b = torch.randn(1, 8), torch.randn(3, 8)
    q1 = ResidualQuantizer(8, 4, 1, init_from_data=False, restart_unused_codes=False)
    q2 = ResidualQuantizer(8, 4, 1, init_from_data=False, restart_unused_codes=False)
    q2.load_state_dict(q1.state_dict())
    w = torch.tensor([0.25] * 4 + [1.0] * 3)
    out1 = q1(torch.cat([a.expand(4, 8), b]), weights=w)
    out2 = q2(torch.cat([a, b]))
    torch.testing.assert_close(q1.codebook, q2.codebook)
    torch.testing.assert_close(q1.cluster_size, q2.cluster_size)
    torch.testing.assert_close(out1.commitment_loss, out2.commitment_loss)


def test_learned_router_gets_gradient_from_the_reconstruction():
    model = fitted("learned").train()
    out = model(digits(8))
    out.reconstruction.pow(2).mean().backward()  # no budget loss in this objective
    grad = model.router.mlp[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert set(out.fine_mask.unique().tolist()) <= {0.0, 1.0}


def test_position_encoding_tells_repeated_codes_apart():
    model = fitted().eval()
    same = torch.zeros(1, 8, 8, 2, dtype=torch.long)  # one code everywhere
    img = model.decode_codes(same)
    assert (img - img.mean((2, 3), keepdim=True)).abs().max() > 1e-3


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="decoder_ch_mult"):
        DQVAE(DQVAEConfig(**{**TINY, "decoder_ch_mult": [1, 2]}))
    with pytest.raises(ConfigError, match="router"):
        DQVAE(DQVAEConfig(**{**TINY, "router": "random"}))
    with pytest.raises(ConfigError, match="fit"):
        DQVAE(DQVAEConfig(**TINY))(digits(2))


def test_overfits_a_few_digits():
    model = fitted().train()
    x = digits(4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        before = float(psnr(model(x).reconstruction.clamp(-1, 1), x).mean())
    model.train()
    for _ in range(100):
        out = model(x)
        loss = (out.reconstruction - x).pow(2).mean() + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(psnr(model(x).reconstruction.clamp(-1, 1), x).mean())
    assert after > before + 6 and after > 16, (before, after)


def test_patch_shortcut_starts_as_the_patch_codec_at_both_grains(tmp_path):
    """Untrained, with 64-dim codes (>= 3·4² patch values): a fine region's code vector is its
    four 4×4 patches, a coarse region's is their mean, and unquantized decoding returns them."""
    model = fitted(embed_dim=64, patch_shortcut=True, zero_init_residual=True).eval()
    x = digits(6, "val")
    z, gate, _ = model.encode(x)
    patches = F.pixel_unshuffle(x, 4)  # (B, 48, 8, 8)
    coarse = F.avg_pool2d(patches, 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    fine = gate.bool().repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    assert 0 < gate.mean() < 1  # both grains occur
    want = torch.where(fine, patches, coarse)
    torch.testing.assert_close(z[..., :48].permute(0, 3, 1, 2), want)
    assert torch.equal(z[..., 48:], torch.zeros_like(z[..., 48:]))
    torch.testing.assert_close(model.decode(z), F.pixel_shuffle(want, 4))
    # trains through both paths; saved and loaded it decodes the same codes alike
    model.train()
    out = model(x)
    ((out.reconstruction - x).pow(2).mean() + out.commitment_loss).backward()
    for w in (model.patch_shortcut.down.weight, model.decoder.conv_out.weight):
        assert w.grad is not None and w.grad.abs().sum() > 0
    model.eval()
    packed = model.encode_to_codes(x)
    model.save_pretrained(tmp_path / "m")
    back = DQVAE.from_pretrained(tmp_path / "m")
    assert back.config.patch_shortcut and back.config.zero_init_residual
    torch.testing.assert_close(back.decode_codes(packed), model.decode_codes(packed))


def test_save_and_load_keep_the_router(tmp_path):
    model = fitted().eval()
    model.save_pretrained(tmp_path / "m")
    back = DQVAE.from_pretrained(tmp_path / "m")
    x = digits(4, "val")
    assert torch.equal(back.encode_to_codes(x), model.encode_to_codes(x))


def test_cli_trains_scores_and_draws_a_dq_vae(tmp_path):
    from test_train_vae import rqgen

    out = tmp_path / "dq"
    small = [f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY.items()]
    rqgen("train-vae", "--data", "bundled:digits", "--out", out, "--config", "dq-tiny32",
          "--steps", 3, "--device", "cpu", *small, "train.batch_size=8", "train.num_workers=0",
          "train.sample_every=3", "train.val_batches=1")  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dqvae" and cfg["config"]["router"] == "entropy"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_fine_fraction" in r for r in rows)
    res = json.loads(rqgen("eval-vae", "--vae", out, "--data", "bundled:digits:val", "--limit",
                           32, "--json", "--no-rfid", "--device", "cpu").stdout)  # fmt: skip
    assert 0 <= res["fine_fraction"] <= 1
    assert res["tokens_per_image"] == pytest.approx(16 * (1 + 3 * res["fine_fraction"]))
    rqgen("reconstruct", "--vae", out, "--input", "bundled:digits", "--out", tmp_path / "rec",
          "--limit", 2, "--device", "cpu")  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert names == [f"000{i}_{k}.png" for i in (0, 1) for k in ("granularity", "pair")]


def test_config_files_select_the_dq_vae(tmp_path):
    from rqgen.configs import DQVAEExperiment, VAEExperiment, load_vae_experiment

    f = tmp_path / "dq.yaml"
    f.write_text("model_type: dqvae\nmodel:\n  resolution: 32\n  ch_mult: [1, 2, 4, 4]\n"
                 "  decoder_ch_mult: [1, 2, 4]\n")  # fmt: skip
    exp = load_vae_experiment(str(f), ["model.router=learned"])
    assert isinstance(exp, DQVAEExperiment) and exp.model.coarse_size == 4
    assert exp.model.router == "learned"
    assert isinstance(load_vae_experiment("tiny32"), VAEExperiment)
    assert isinstance(load_vae_experiment("dq-tiny32"), DQVAEExperiment)
    f.write_text("model_type: vqgan\n")
    with pytest.raises(ConfigError, match="rqvae or dqvae"):
        load_vae_experiment(str(f))
