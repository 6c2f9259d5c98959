"""RQVAE: shapes, presets with the official layout, checkpoint round trip, learning."""

import json

import pytest
import torch
import torch.nn.functional as F

from rqgen import RQVAE, RQVAEConfig
from rqgen.configs import load_vae_experiment
from rqgen.errors import CheckpointError, ConfigError
from rqgen.stage1.blocks import PatchShortcut


def small_config(**kw) -> RQVAEConfig:
    base = dict(
        resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
        z_channels=16, embed_dim=16, codebook_size=32, code_depth=4,
    )  # fmt: skip
    return RQVAEConfig(**{**base, **kw})


def test_tiny32_shapes_match_the_papers_code_shape():
    cfg = load_vae_experiment("tiny32").model
    assert cfg.code_shape == (8, 8, 4) and cfg.downsample_factor == 4
    vae = RQVAE(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 8, 8, cfg.embed_dim)
    out = vae(x)
    assert out.reconstruction.shape == x.shape and out.codes.shape == (2, 8, 8, 4)
    vae.eval()
    codes = vae.encode_to_codes(x)
    assert vae.decode_codes(codes).shape == x.shape
    assert vae.decode_codes(codes, depth=1).shape == x.shape


def test_imagenet256_preset_has_the_official_layer_shapes():
    vae = RQVAE(load_vae_experiment("imagenet256").model)
    sd = vae.state_dict()
    assert sd["encoder.conv_out.weight"].shape == (256, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (256, 256, 1, 1)
    assert sd["encoder.down.5.attn.1.q.weight"].shape == (512, 512, 1, 1)
    assert "encoder.down.4.downsample.conv.weight" in sd
    assert "encoder.down.5.downsample.conv.weight" not in sd
    assert "decoder.up.5.block.2.conv2.weight" in sd  # 3 blocks per level in the decoder
    assert "decoder.up.5.attn.2.proj_out.weight" in sd
    assert (
        "decoder.up.1.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    )
    assert "encoder.mid.attn_1.q.weight" in sd and "decoder.mid.block_2.conv1.weight" in sd
    assert sd["quantizer.codebook"].shape == (1, 16384, 256)  # shared: stored once
    n_params = sum(p.numel() for p in vae.parameters())
    assert 95e6 < n_params < 115e6  # the official model has about 104M with K = 16384
    assert vae.config.code_shape == (8, 8, 4)


def test_ffhq256_preset_attends_at_16():
    sd = RQVAE(load_vae_experiment("ffhq256").model).state_dict()
    assert "encoder.down.4.attn.0.q.weight" in sd and "encoder.down.5.attn.0.q.weight" not in sd
    assert sd["quantizer.codebook"].shape == (1, 2048, 256)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = RQVAE(small_config()).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    vae(x)  # data-init the codebook and take one EMA step
    vae.eval()
    vae.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert files == {"config.json", "model.safetensors", "README.md"}
    loaded = RQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == vae.config
    assert torch.equal(loaded.encode_to_codes(x), vae.encode_to_codes(x))
    torch.testing.assert_close(loaded(x).reconstruction, vae(x).reconstruction)


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    RQVAE(small_config()).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["config"]["codebook_size"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        RQVAE.from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value) and "3 with another shape (e.g. quantizer." in str(e.value)

    cfg["model_type"] = "rq_transformer"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not 'rqvae'"):
        RQVAE.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a model directory"):
        RQVAE.from_pretrained(tmp_path / "nothing")


def test_truncated_weights_are_a_clear_error(tmp_path):
    RQVAE(small_config()).save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        RQVAE.from_pretrained(tmp_path / "m")


def test_loss_falls_on_tiny_data():
    torch.manual_seed(0)
    vae = RQVAE(small_config(attn_resolutions=[])).train()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    x = F.avg_pool2d(x, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)  # learnable
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = vae(x)
        loss = F.mse_loss(out.reconstruction, x) + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_vae_experiment("no-such-preset")
    with pytest.raises(ConfigError) as e:
        load_vae_experiment("tiny32", ["model.no_such_key=3"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        load_vae_experiment("tiny32", ["model.code_depth=four"])
    with pytest.raises(ConfigError, match="key=value"):
        load_vae_experiment("tiny32", ["model.code_depth"])


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  resolution: 64\n  code_depth: 2\ntrain:\n  lr: 0.001\n")
    exp = load_vae_experiment(str(f), ["train.steps=7"])
    assert exp.model.resolution == 64 and exp.model.code_depth == 2
    assert exp.train.lr == 1e-3 and exp.train.steps == 7


def test_zero_initialised_residual_branches_start_as_their_skip_paths():
    from rqgen.stage1.blocks import AttnBlock, ResnetBlock

    cfg = RQVAEConfig(resolution=16, ch=8, ch_mult=[1, 2], num_res_blocks=1,
                      attn_resolutions=[8], z_channels=8, embed_dim=8, codebook_size=16,
                      code_depth=2, zero_init_residual=True)  # fmt: skip
    torch.manual_seed(0)
    blocks = [m for m in RQVAE(cfg).modules() if isinstance(m, (ResnetBlock, AttnBlock))]
    same_width = [b for b in blocks if not hasattr(b, "nin_shortcut")]
    assert len(same_width) >= 6 and any(isinstance(b, AttnBlock) for b in same_width)
    for block in same_width:
        width = (block.norm1 if isinstance(block, ResnetBlock) else block.norm).num_channels
        y = torch.randn(2, width, 8, 8)
        assert torch.equal(block(y), y)  # the block is its skip path until it learns
    torch.manual_seed(0)
    plain = RQVAE(RQVAEConfig(**{**cfg.__dict__, "zero_init_residual": False}))
    assert plain.decoder.mid.block_1.conv2.weight.abs().sum() > 0


def test_patch_shortcut_starts_as_the_raw_patch_codec_and_round_trips(tmp_path):
    # f = 4: 3·16 = 48 patch values fit in 64-dim code vectors -> identity start
    cfg = small_config(ch_mult=[1, 2, 2], embed_dim=64, patch_shortcut=True)
    torch.manual_seed(0)
    vae = RQVAE(cfg).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    patches = F.pixel_unshuffle(x, 4).permute(0, 2, 3, 1)  # (B, 8, 8, 48)
    torch.testing.assert_close(z[..., :48], patches)
    assert torch.equal(z[..., 48:], torch.zeros_like(z[..., 48:]))
    torch.testing.assert_close(vae.decode(z), x)  # unquantized: lossless before training
    # quantized: depth d decodes to the patches of the partial sum Ẑ(d) (Eq. 12)
    vae.train()
    vae(x)  # initialises the codebook from these vectors
    vae.eval()
    codes = vae.encode_to_codes(x)
    for d in range(1, 5):
        partial = vae.quantizer.decode_codes(codes, d)[..., :48].permute(0, 3, 1, 2)
        torch.testing.assert_close(vae.decode_codes(codes, d), F.pixel_shuffle(partial, 4))
    # eval-vae reports what the quantizer costs: here the unquantized path is lossless
    from torch.utils.data import TensorDataset

    from rqgen.evaluate.vae import evaluate_vae

    scores = evaluate_vae(vae, TensorDataset(x, torch.zeros(3)), rfid=False, progress=False)
    assert scores["unquantized_psnr"] > 60 > scores["psnr"]
    vae.save_pretrained(tmp_path / "m")
    back = RQVAE.from_pretrained(tmp_path / "m")
    assert back.config.patch_shortcut
    torch.testing.assert_close(back.decode_codes(codes), vae.decode_codes(codes))


def test_patch_shortcut_starts_as_the_sub_patch_mean_where_patches_exceed_the_code():
    # 16-dim code vectors < 48 values of a 4×4 patch: the shortcut starts as the codec of the
    # mean of its four 2×2 sub-patches (12 values); both paths receive gradients
    torch.manual_seed(0)
    vae = RQVAE(small_config(patch_shortcut=True)).eval()
    assert vae.patch_shortcut.starts_as_codec and vae.patch_shortcut.side == 2
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    mean = F.avg_pool2d(F.pixel_unshuffle(x, 2), 2)  # (B, 12, 8, 8): (c, u, v) of the 2×2
    z = vae.encode(x)
    torch.testing.assert_close(z[..., :12].permute(0, 3, 1, 2), mean)
    assert torch.equal(z[..., 12:], torch.zeros_like(z[..., 12:]))
    copied = F.pixel_shuffle(F.interpolate(mean, scale_factor=2, mode="nearest"), 2)
    torch.testing.assert_close(vae.decode(z), copied)
    vae.train()
    out = vae(x)
    (F.mse_loss(out.reconstruction, x) + out.commitment_loss).backward()
    for p in (vae.patch_shortcut.down.weight, vae.patch_shortcut.up.weight,
              vae.quant_conv.weight, vae.decoder.conv_out.weight):  # fmt: skip
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not PatchShortcut(3, 4, 2).starts_as_codec  # not even one pixel fits: learned


@pytest.mark.parametrize("choices", [[], [1, 3]])
def test_quantizer_dropout_decodes_each_image_from_its_own_prefix(choices):
    torch.manual_seed(0)
    vae = RQVAE(small_config(quantize_dropout=True, quantize_dropout_depths=choices)).train()
    vae.quantizer.frozen = True  # no codebook update: the codes below decode as in forward
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    vae(x)  # the first training forward initialises the codebook from the data
    torch.manual_seed(1)
    out = vae(x)
    torch.manual_seed(1)
    table = torch.tensor(choices or [1, 2, 3, 4])
    depths = table[torch.randint(len(table), (8,))]  # what the forward drew
    assert len(set(depths.tolist())) > 1
    with torch.no_grad():
        for b, d in enumerate(depths.tolist()):
            want = vae.decode_codes(out.codes[b : b + 1], d)
            torch.testing.assert_close(out.reconstruction[b : b + 1], want, atol=1e-5, rtol=1e-5)
        vae.eval()
        full = vae(x)  # evaluation: the whole stack, whatever the setting
        torch.testing.assert_close(full.reconstruction, vae.decode_codes(full.codes))


def test_rq_vae_spends_its_code_budget_where_the_residual_is_largest():
    from rqgen.quantize.dynamic import quantize_with_energy, stack_depths

    torch.manual_seed(0)
    vae = RQVAE(small_config()).train()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    x[:2, :, :16] = 0  # half of two images is flat: their stacks there should be short
    vae(x)  # initialises the codebook
    vae.eval()
    stacks = vae.encode_to_stacks(x, mean_depth=2.0)
    depths = stack_depths(stacks, vae.config.codebook_size)  # (B, 8, 8)
    assert (depths.flatten(1).sum(1) == 2 * 64).all()
    assert depths[:2, :4].float().mean() < depths[:2, 4:].float().mean()
    # the whole budget decodes like the fixed full-depth map
    full = vae.encode_to_stacks(x, mean_depth=4.0)
    torch.testing.assert_close(vae.decode_stacks(full), vae.decode_codes(vae.encode_to_codes(x)))
    # and the dynamic map leaves no more residual energy than the fixed depth-2 one
    codes, energy = quantize_with_energy(vae.quantizer, vae.encode(x))
    assert energy.gather(-1, depths[..., None]).sum() <= energy[..., 2].sum()
