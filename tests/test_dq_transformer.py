"""DQ-Transformer: causality, loss, sampler validity and cache equivalence, learning, CLI."""

import json

import pytest
import torch

from rqgen import DQTransformer, DQTransformerConfig
from rqgen.errors import ConfigError
from rqgen.stage1.dqvae import unpack_codes
from rqgen.stage2.dq_sampling import sample_dq_codes
from rqgen.stage2.dq_sequence import DQSequence, from_sequence, to_sequence
from rqgen.stage2.dq_transformer import stack_sequence
from rqgen.stage2.sampling import SamplingConfig


def model(num_classes: int = 3, coarse_size: int = 3, K: int = 16, seed: int = 0) -> DQTransformer:
    torch.manual_seed(seed)
    cfg = DQTransformerConfig(codebook_size=K, coarse_size=coarse_size, width=32, heads=2,
                              position_layers=1, content_layers=2, dropout=0.0,
                              num_classes=num_classes)  # fmt: skip
    return DQTransformer(cfg).eval()


def random_maps(n: int, hc: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fine = torch.rand(n, hc, hc, generator=g) < 0.5
    codes = torch.randint(0, K, (n, 2 * hc, 2 * hc), generator=g)
    coarse = torch.randint(0, K, (n, hc, hc), generator=g)
    up = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    keep = fine.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return torch.where(keep, codes, up), fine


def test_logits_depend_only_on_what_the_model_may_see():
    m = model()
    codes, fine = random_maps(2, 3, 16)
    seq = stack_sequence(to_sequence(codes, fine, m.config.vocab))
    cond = torch.tensor([0, 2])
    content, pos = m(seq, cond)
    t = 5
    other = seq.clone()
    other[:, 0, t + 1 :] = (other[:, 0, t + 1 :] + 1) % 16  # later contents changed
    c2, p2 = m(other, cond)
    # logits at s predict token s+1: up to s = t they never see contents after t
    torch.testing.assert_close(c2[:, : t + 1], content[:, : t + 1])
    torch.testing.assert_close(p2[:, : t + 1], pos[:, : t + 1])
    moved = seq.clone()
    moved[:, 1, t + 1] = (moved[:, 1, t + 1] + 1) % 9  # the position of token t+1
    c3, p3 = m(moved, cond)
    torch.testing.assert_close(p3[:, : t + 1], pos[:, : t + 1])  # positions: causal
    torch.testing.assert_close(c3[:, :t], content[:, :t])
    assert not torch.allclose(c3[:, t], content[:, t])  # content t+1 sees position t+1


def test_loss_ignores_padding_and_checks_classes():
    m = model()
    codes, fine = random_maps(3, 3, 16, seed=1)
    seq = stack_sequence(to_sequence(codes, fine, m.config.vocab))
    v = m.config.vocab
    pad = torch.tensor([v.content_pad, v.position_pad(True), 1])[None, :, None].expand(3, 3, 7)
    cond = torch.tensor([0, 1, 2])
    loss, parts = m.loss(seq, cond)
    loss2, _ = m.loss(torch.cat([seq, pad], 2), cond)
    torch.testing.assert_close(loss, loss2)
    assert set(parts) == {"content_loss", "coarse_pos_loss", "fine_pos_loss"}
    with pytest.raises(ConfigError, match="out of range"):
        m.loss(seq, torch.tensor([0, 1, 7]))


@pytest.mark.parametrize("cfg", [SamplingConfig(), SamplingConfig(0.8, 5, 0.9, 2.5)])
def test_cached_and_uncached_sampling_agree(cfg):
    m = model(coarse_size=2)
    cond = torch.tensor([0, 1, 2, 3])
    a = sample_dq_codes(m, cond, cfg, torch.Generator().manual_seed(3), use_cache=True)
    b = sample_dq_codes(m, cond, cfg, torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_sampled_sequences_are_valid_and_laid_out_as_in_training():
    m = model(coarse_size=3)
    v = m.config.vocab
    cond = torch.arange(48) % 4
    packed, seq = sample_dq_codes(m, cond, None, torch.Generator().manual_seed(0),
                                  return_sequence=True)  # fmt: skip
    codes, fine = unpack_codes(packed)
    assert fine.float().mean().item() not in (0.0, 1.0)  # a mix of granularities
    # the exact token streams a training example of this map would have (EOS contents
    # included), then padding
    ref = to_sequence(codes, fine, v)
    L = ref.content.shape[1]
    for a, b in zip((ref.content, ref.position, ref.segment),
                    (seq.content, seq.position, seq.segment)):  # fmt: skip
        assert torch.equal(a, b[:, :L])
    assert (seq.content[:, L:] == v.content_pad).all()
    for b in range(len(cond)):  # no position twice, every cell covered exactly once
        pos, seg = seq.position[b].tolist(), seq.segment[b].tolist()
        coarse = [p for p, s in zip(pos, seg) if s == 0 and p < v.n_coarse]
        fine_cells = [p for p, s in zip(pos, seg) if s == 1 and p < v.n_fine]
        assert coarse == sorted(set(coarse))  # ascending, never repeated
        assert len(fine_cells) == len(set(fine_cells))
        covered = sorted(fine_cells + [q for r in coarse for q in v.fine_positions_of_region(r)])
        assert covered == list(range(v.n_fine))
    from_sequence(seq, v)


def test_sampler_reaches_both_extremes_and_the_last_coarse_cell():
    m = model(coarse_size=2)
    v = m.config.vocab
    head = m.coarse_pos_head[-1]
    cond = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[v.position_eos(False)] = 30.0  # always EOS first: every region fine
    fine = unpack_codes(sample_dq_codes(m, cond))[1]
    assert fine.all()
    with torch.no_grad():
        head.bias.fill_(-30.0)
        # the next free cell first, EOS never while a cell is left: every region coarse
        head.bias[: v.n_coarse] = 30.0 - 10.0 * torch.arange(v.n_coarse)
    fine = unpack_codes(sample_dq_codes(m, cond))[1]
    assert not fine.any()
    with torch.no_grad():
        head.bias.fill_(-30.0)
        head.bias[v.n_coarse - 1] = 30.0  # straight to the last cell, then only EOS is left
    fine = unpack_codes(sample_dq_codes(m, cond))[1].flatten(1)
    assert (~fine[:, -1]).all() and fine[:, :-1].all()


def test_overfits_a_few_code_maps_per_class():
    m = model(num_classes=2, coarse_size=2, K=8)
    codes, fine = random_maps(2, 2, 8, seed=4)
    fine[0] = torch.tensor([[True, False], [False, True]])
    fine[1] = torch.tensor([[False, False], [False, True]])
    codes, fine = from_sequence(to_sequence(codes, fine, m.config.vocab), m.config.vocab)
    seq = stack_sequence(to_sequence(codes, fine, m.config.vocab))
    cond = torch.tensor([0, 1])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for _ in range(150):
        loss, _ = m.loss(seq, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    out = sample_dq_codes(m, torch.tensor([0, 1, 0, 1]), SamplingConfig(temperature=0.1))
    got_codes, got_fine = unpack_codes(out)
    assert torch.equal(got_fine, fine.repeat(2, 1, 1))
    assert torch.equal(got_codes, codes.repeat(2, 1, 1))


def test_save_load_and_vae_pairing(tmp_path):
    from rqgen import DQVAE, DQVAEConfig
    from rqgen.errors import CheckpointError

    vae = DQVAE(DQVAEConfig(resolution=32, ch=8, ch_mult=[1, 2, 2, 2], decoder_ch_mult=[1, 2, 2],
                            num_res_blocks=1, attn_resolutions=[], decoder_attn_resolutions=[],
                            z_channels=8, embed_dim=8, codebook_size=16))  # fmt: skip
    m = DQTransformer.for_vae(vae, width=32, heads=2, position_layers=1, content_layers=1)
    assert m.config.coarse_size == 4 and m.config.codebook_size == 16
    m.check_vae(vae)
    m.save_pretrained(tmp_path / "ar")
    back = DQTransformer.from_pretrained(tmp_path / "ar")
    seq = DQSequence(*to_sequence(*random_maps(1, 4, 16), m.config.vocab).__dict__.values())
    torch.testing.assert_close(back.loss(seq, torch.zeros(1, dtype=torch.long))[0],
                               m.eval().loss(seq, torch.zeros(1, dtype=torch.long))[0])  # fmt: skip
    with torch.no_grad():
        vae.quantizer.codebook.add_(1.0)
    with pytest.raises(CheckpointError, match="another DQ-VAE"):
        m.check_vae(vae)


def train_tiny_dq_vae(out):
    """A tiny DQ-VAE trained 2 steps on the digits, through the CLI."""
    from test_dqvae import TINY
    from test_train_vae import rqgen

    small = [f"model.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY.items()]
    rqgen("train-vae", "--data", "bundled:digits", "--out", out, "--config", "dq-tiny32",
          "--steps", 2, "--device", "cpu", *small, "train.batch_size=8",
          "train.num_workers=0")  # fmt: skip
    return out


def test_cli_trains_and_samples_a_dq_transformer(tmp_path):
    from test_train_vae import rqgen

    vae = train_tiny_dq_vae(tmp_path / "vae")
    ar = tmp_path / "ar"
    rqgen("train-ar", "--vae", vae, "--data", "bundled:digits", "--out", ar, "--config",
          "dq-ar-tiny", "--steps", 4, "--device", "cpu", "model.width=32", "model.heads=2",
          "train.batch_size=8", "train.eval_every=2")  # fmt: skip
    meta = json.loads((ar / "config.json").read_text())
    assert meta["model_type"] == "dq_transformer" and meta["config"]["num_classes"] == 10
    rows = [json.loads(r) for r in (ar / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    rqgen("sample", "--model", ar, "--n", 6, "--cfg", 2, "--out", tmp_path / "s",
          "--save-codes", tmp_path / "codes.npy", "--device", "cpu")  # fmt: skip
    import numpy as np

    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (6, 8, 8, 2) and len(list((tmp_path / "s").glob("*.png"))) == 7
    bad = rqgen("train-ar", "--vae", vae, "--data", "bundled:digits", "--out", tmp_path / "x",
                "--config", "ar-tiny", "--steps", 1, "--device", "cpu", check=False)  # fmt: skip
    assert bad.returncode != 0 and "soft_labels=false" in bad.stderr.strip().splitlines()[-1]


def test_per_sample_seeds_make_each_dq_sample_independent_of_its_batch():
    from rqgen.stage2.guidance import PerSampleSeeds

    m, cond = model(), torch.tensor([0, 1, 2, 1])
    cfg = SamplingConfig(guidance_scale=2.0)
    seeds = PerSampleSeeds([5, 6, 7, 8])
    whole = sample_dq_codes(m, cond, cfg, seeds)
    assert torch.equal(sample_dq_codes(m, cond[1:3], cfg, seeds[1:3]), whole[1:3])
    assert torch.equal(sample_dq_codes(m, cond, cfg, seeds, use_cache=False), whole)
