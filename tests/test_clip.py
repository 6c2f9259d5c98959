"""CLIP re-ranking: a tiny CLIP built here stands in for the real weights (never downloaded)."""

import pytest
import torch
from test_rq_transformer import _FakeVAE, make

from rqgen.errors import CheckpointError, ConfigError
from rqgen.evaluate.clip import CLIPScorer
from rqgen.pipeline import RQPipeline


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (32 px images, 1-layer towers) plus a BPE tokenizer, saved in
    the huggingface layout that `CLIPScorer.load` reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("clip")
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "a photo of the handwritten digit zero one two three red green cat dog"
    bpe.train_from_iterator(
        [words] * 4, trainers.BpeTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"])
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="[PAD]", unk_token="[UNK]")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(out)
    return out


def test_loads_local_clip_and_scores_each_pair(tiny_clip):
    scorer = CLIPScorer.load(tiny_clip)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    texts = ["a red cat", "a green dog", "digit one", "a photo of the digit two"]
    s = scorer.similarity(images, texts)
    assert s.shape == (4,) and (s.abs() <= 1).all()
    # pairwise: row i depends only on pair i (same result in another order and batch)
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(scorer.similarity(images[perm], [texts[i] for i in perm]), s[perm])
    torch.testing.assert_close(scorer.similarity(images[:1], texts[:1]), s[:1])
    # larger images are resized to the model's 32 px; a 2× nearest upscale changes little
    up = images.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert (scorer.similarity(up, texts) - s).abs().max() < 0.2
    assert scorer.clip_score(images, texts) == pytest.approx(float(s.mean()))
    assert scorer.clip_score(images, texts, torchmetrics_scale=True) == pytest.approx(
        float(100 * s.clamp(min=0).mean())
    )


def test_missing_clip_weights_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="huggingface-cli download .*--clip DIR"):
        CLIPScorer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no CLIP weights"):
        CLIPScorer.load(tmp_path / "empty")
    monkeypatch.setenv("RQGEN_CLIP", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="nowhere"):
        CLIPScorer.load()


class _BrightnessScorer:
    """Stands in for CLIP: 'similarity' is the image brightness, signed by the caption."""

    def similarity(self, images, texts):
        sign = torch.tensor([1.0 if t == "bright" else -1.0 for t in texts])
        return sign * images.mean((1, 2, 3))


def test_rerank_keeps_the_best_candidates_of_the_same_draw():
    m = make()
    vae = _FakeVAE(m)
    cond = torch.tensor([1, 1, 1, 0, 0])
    texts = ["bright", "bright", "bright", "dark", "dark"]
    pipe = RQPipeline(m, vae)
    codes, kept = pipe.clip_rerank(cond, texts, _BrightnessScorer(), 4,
                                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert kept.shape == (5, 3, 4, 4) and codes.shape == (5, 3, 3, 3)
    # the same generator state draws the same 4·n candidates: class 0 first (sorted groups)
    g = torch.Generator().manual_seed(3)
    cand0 = pipe.sample(torch.zeros(8, dtype=torch.long), generator=g)[1]
    cand1 = pipe.sample(torch.ones(12, dtype=torch.long), generator=g)[1]
    darkest = cand0.mean((1, 2, 3)).sort().values[:2]
    brightest = cand1.mean((1, 2, 3)).sort(descending=True).values[:3]
    torch.testing.assert_close(kept[3:].mean((1, 2, 3)), darkest)
    torch.testing.assert_close(kept[:3].mean((1, 2, 3)), brightest)
    with pytest.raises(ConfigError, match="at least 1 candidate"):
        pipe.clip_rerank(cond, texts, _BrightnessScorer(), 0)


@pytest.fixture(scope="module")
def text_ar(vae, tmp_path_factory):
    from test_train_ar import train_ar

    out = tmp_path_factory.mktemp("text_ar") / "ar"
    train_ar(vae, out, 2, "model.conditioning=text")
    return out


def test_clip_rerank_from_the_cli(tiny_clip, text_ar, tmp_path):
    import numpy as np
    from test_train_vae import rqgen

    args = ["sample", "--model", text_ar, "--n", 2, "--prompt", "the digit two", "--device", "cpu"]
    rqgen(*args, "--clip-rerank", 3, "--clip", tiny_clip, "--out", tmp_path / "g.png",
          "--save-codes", tmp_path / "c.npy")  # fmt: skip
    assert np.load(tmp_path / "c.npy").shape == (2, 8, 8, 4)
    r = rqgen(*args, "--clip-rerank", 3, "--clip", tmp_path / "nowhere", "--out",
              tmp_path / "h.png", check=False)  # fmt: skip
    assert r.returncode != 0 and "no CLIP weights" in r.stderr and not (tmp_path / "h.png").exists()


def test_eval_gen_of_a_text_model_reports_clip_score(tiny_clip, text_ar, tmp_path, rqgen_cache):
    import json

    from test_train_vae import rqgen

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\n\na handwritten digit seven\n")
    args = ["eval-gen", "--model", text_ar, "--n", 6, "--prompts", prompts, "--ref",
            "bundled:digits:val", "--features", "digits", "--json", "--device", "cpu"]  # fmt: skip
    r = rqgen(*args, "--clip", tiny_clip, "--out", tmp_path / "s", env_extra=rqgen_cache)
    res = json.loads(r.stdout)
    assert (
        res["n_samples"] == 6 and -1 <= res["clip_score"] <= 1 and "CLIP" in res["clip_evaluator"]
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir())[0] == "000000_text.png"
    r = rqgen(*args, "--clip", tmp_path / "nowhere", "--out", tmp_path / "t", env_extra=rqgen_cache)
    res = json.loads(r.stdout)
    assert res["clip_score"] is None and "no CLIP weights" in res["clip_score_note"]
