"""Importing official checkpoints: layout, safety, and equivalence to the official code.

tests/data/official/ holds small reference tensors made by running the official
implementation (kakaobrain/rq-vae-transformer at 341395e, outside this repository) on random
weights in small configs: its state dicts (official key layout, shared codebook stored under
every depth, padding row included), its config.yaml files, and its outputs for fixed inputs:
features, codes and decoded images of the RQ-VAE, and logits of class-conditional,
unconditional and text-conditional RQ-Transformers. See tests/data/official/README.md.
"""

import pickle

import pytest
import torch
from safetensors.torch import load_file

from rqgen.convert.official import convert_stage1, convert_stage2, load_official_state
from rqgen.errors import CheckpointError

DATA = __import__("pathlib").Path(__file__).parent / "data" / "official"


def official_dir(tmp_path, stage: str, ema: bool = False):
    """An official-style checkpoint directory: model.pt (plain tensor pickle) + config.yaml."""
    d = tmp_path / stage
    d.mkdir()
    state = load_file(str(DATA / f"{stage}_state.safetensors"))
    ckpt = {"state_dict": state, "epoch": 3}
    if ema:
        ckpt["state_dict_ema"] = {f"module.{k}": v + 1 for k, v in state.items()}
    torch.save(ckpt, d / "model.pt")
    (d / "config.yaml").write_text((DATA / f"{stage}_config.yaml").read_text())
    return d


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return convert_stage1(official_dir(tmp_path_factory.mktemp("s1"), "stage1"))


def test_stage1_matches_the_official_code(vae):
    ref = load_file(str(DATA / "stage1_io.safetensors"))
    with torch.no_grad():
        z = vae.encode(ref["images"])
        codes = vae.encode_to_codes(ref["images"])
        decoded = vae.decode_codes(ref["codes"])
    torch.testing.assert_close(z, ref["features"], atol=1e-5, rtol=1e-5)
    assert torch.equal(codes, ref["codes"])
    assert (decoded - ref["decoded"]).abs().max() < 1e-5
    assert vae.quantizer.codebook.shape == (1, 32, 16)  # shared codebook stored once, no padding


def official_bpe(tmp_path):
    """vocab.json + merges.txt as the official release ships them (a lowercasing CharBPE),
    small enough for the 50-token test model."""
    from tokenizers import CharBPETokenizer

    from rqgen.stage2.text import TextTokenizer

    bpe = CharBPETokenizer(unk_token="[UNK]", lowercase=True)
    bpe.train_from_iterator(["a photo of a red cat", "a dog on the grass"] * 3, vocab_size=40,
                            special_tokens=["[UNK]"], show_progress=False)  # fmt: skip
    vocab, merges = bpe.save_model(str(tmp_path))
    return TextTokenizer.from_official(vocab, merges, length=6), vocab, merges


@pytest.mark.parametrize("kind", ["class", "uncond", "text"])
def test_stage2_logits_match_the_official_code(vae, tmp_path, kind):
    tokenizer = official_bpe(tmp_path)[0] if kind == "text" else None
    model = convert_stage2(official_dir(tmp_path, f"stage2_{kind}"), vae, tokenizer=tokenizer)
    ref = load_file(str(DATA / f"stage2_{kind}_io.safetensors"))
    codes = load_file(str(DATA / "stage1_io.safetensors"))["codes"]
    cond = ref["cond"]
    if kind == "class":
        cond = cond[:, 0]
        assert model.config.num_classes == 10
    elif kind == "uncond":
        cond = torch.full((len(codes),), model.null_class)
        assert model.config.num_classes == 0
    with torch.no_grad():
        logits, text_logits = model(codes, cond)
    assert (logits.view(ref["logits"].shape) - ref["logits"]).abs().max() < 1e-4  # (B,H,W,D,K)
    if kind == "text":
        assert (text_logits - ref["cond_logits"]).abs().max() < 1e-4
        assert model.config.text_pad_id == tokenizer.pad_id == tokenizer.vocab_size - 1
    model.check_vae(vae)  # the converted pair is recognised as a pair


def test_ema_weights_and_module_prefix(tmp_path):
    d = official_dir(tmp_path, "stage1", ema=True)
    plain, ema = load_official_state(d / "model.pt"), load_official_state(d / "model.pt", ema=True)
    assert set(plain) == set(ema)
    k = "encoder.conv_in.weight"
    torch.testing.assert_close(ema[k], plain[k] + 1)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    d = official_dir(tmp_path, "stage1")
    state = load_file(str(DATA / "stage1_state.safetensors"))
    del state["decoder.conv_out.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, d / "model.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 keys \(e.g. decoder.conv_out.weight\)"):
        convert_stage1(d)
    state = load_file(str(DATA / "stage1_state.safetensors"))
    del state["quantizer.codebooks.3.weight"]
    torch.save({"state_dict": state}, d / "model.pt")
    with pytest.raises(CheckpointError, match="quantizer.codebooks.3.weight"):
        convert_stage1(d)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = official_dir(tmp_path, "stage1")
    with open(d / "model.pt", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        convert_stage1(d)
    assert not (tmp_path / "pwned.txt").exists()


def test_unsupported_variants_and_mismatched_pairs(vae, tmp_path):
    d = official_dir(tmp_path, "stage2_class")
    text = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(
        text.replace("cumsum_depth_ctx: true", "cumsum_depth_ctx: false")
    )
    with pytest.raises(CheckpointError, match="cumsum_depth_ctx"):
        convert_stage2(d, vae)
    (d / "config.yaml").write_text(text.replace("vocab_size: 32", "vocab_size: 64"))
    with pytest.raises(CheckpointError, match="does not match the stage-1"):
        convert_stage2(d, vae)
    with pytest.raises(CheckpointError, match="no config.yaml"):
        convert_stage1(tmp_path)


def test_cli_converts_a_pair_that_rqgen_sample_loads(tmp_path):
    import json

    from test_train_vae import rqgen

    s1, s2 = official_dir(tmp_path, "stage1"), official_dir(tmp_path, "stage2_class")
    out = tmp_path / "converted"
    rqgen("convert-official", "--stage1", s1, "--stage2", s2, "--out", out)
    meta = json.loads((out / "ar" / "config.json").read_text())
    assert meta["conditioning"] == "class" and meta["converted_from"] == "official"
    rqgen("sample", "--model", out / "ar", "--n", 2, "--class", "4", "--device", "cpu",
          "--out", tmp_path / "g.png", "--save-codes", tmp_path / "c.npy")  # fmt: skip
    assert __import__("numpy").load(tmp_path / "c.npy").shape == (2, 8, 8, 4)
    r = rqgen("convert-official", "--stage1", tmp_path / "nowhere", "--out", out, check=False)
    assert r.returncode == 2 and "no config.yaml" in r.stderr and len(r.stderr.splitlines()) == 1


def test_official_bpe_round_trips_and_text_models_need_it(vae, tmp_path):
    tok, vocab, merges = official_bpe(tmp_path)
    ids = tok.encode(["A Red Cat"])
    assert ids.shape == (1, 6) and (ids[0, -1] == tok.pad_id)  # padded with [PAD]
    assert tok.decode(ids) == ["a red cat"]  # lowercased, as the official tokenizer
    with pytest.raises(CheckpointError, match="--bpe-vocab"):
        convert_stage2(official_dir(tmp_path, "stage2_text"), vae)
    from test_train_vae import rqgen

    out = tmp_path / "conv"
    s1, s2 = official_dir(tmp_path, "stage1"), tmp_path / "stage2_text"
    rqgen("convert-official", "--stage1", s1, "--stage2", s2, "--bpe-vocab", vocab,
          "--bpe-merges", merges, "--out", out)  # fmt: skip
    rqgen("sample", "--model", out / "ar", "--n", 2, "--prompt", "a red cat", "--device", "cpu",
          "--out", tmp_path / "t.png")  # fmt: skip
    assert (tmp_path / "t.png").is_file()


def _reference_attention(attn, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal multi-head attention written out as the official code does it: q, k, v split
    into `heads` slices of C / heads channels, softmax(q k^T / sqrt(dh)) v, then proj."""
    B, T, C = x.shape
    q, k, v = (lin(x).view(B, T, heads, C // heads).transpose(1, 2)
               for lin in (attn.query, attn.key, attn.value))  # fmt: skip
    att = (q @ k.transpose(-1, -2)) / (C // heads) ** 0.5
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    return attn.proj((att @ v).transpose(1, 2).reshape(B, T, C))


def test_spatial_and_depth_transformers_may_have_different_head_counts(vae, tmp_path):
    d = official_dir(tmp_path, "stage2_class")
    text = (d / "config.yaml").read_text()
    head_part = text.index("head:\n")
    (d / "config.yaml").write_text(
        text[:head_part] + text[head_part:].replace("n_head: 4", "n_head: 2", 1)
    )
    model = convert_stage2(d, vae)
    assert model.config.heads == 4 and model.config.depth_heads == 2
    body, head = model.spatial_transformer.blocks[0].attn, model.depth_transformer.blocks[0].attn
    assert (body.heads, head.heads) == (4, 2)
    x = torch.randn(3, 5, model.config.width)
    with torch.no_grad():
        for attn, heads in ((body, 4), (head, 2)):
            torch.testing.assert_close(attn(x), _reference_attention(attn, x, heads))
        # and 2 heads are not 4: the head count is really used
        assert not torch.allclose(head(x), _reference_attention(head, x, 4), atol=1e-4)
