"""Fine-tuning (train.init_from): both stages start from a trained or converted model with a
fresh optimizer; a frozen codebook stays exact; the class embedding adapts; anything else
that does not fit is one line naming the tensor."""

import dataclasses
import json

import torch
from test_convert_official import official_dir
from test_train_ar import train_ar
from test_train_vae import rqgen

from rqgen import RQPipeline, RQTransformer, RQTransformerConfig
from rqgen.convert.official import convert_stage1
from rqgen.stage1 import load_vae
from rqgen.train.init import start_from

TRAIN = ["train.batch_size=8", "train.num_workers=0", "train.log_every=1", "train.ckpt_every=5",
         "train.sample_every=10", "train.val_batches=1", "train.warmup_steps=0"]  # fmt: skip


def test_the_official_rq_vae_converted_fine_tunes_with_its_codebook_frozen(tmp_path):
    official = convert_stage1(official_dir(tmp_path, "stage1"))  # official layout, random weights
    official.save_pretrained(tmp_path / "official")
    same = [f"model.{k}={json.dumps(v).replace(' ', '')}"  # its own architecture
            for k, v in dataclasses.asdict(official.config).items()]  # fmt: skip
    start = [f"train.init_from={tmp_path / 'official'}", "train.freeze_codebook=true"]
    rqgen("train-vae", "--data", "bundled:digits", "--out", tmp_path / "ft", "--steps", 1,
          "--device", "cpu", *same, *TRAIN, *start)  # fmt: skip
    tuned = load_vae(tmp_path / "ft")
    assert torch.equal(tuned.quantizer.codebook, official.quantizer.codebook)  # frozen: exact
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (tuned, official))
    moved = float((a - b).norm() / b.norm())  # one Adam step away from the converted weights
    assert 0 < moved < 0.05
    bad = rqgen("train-vae", "--data", "bundled:digits", "--out", tmp_path / "no", "--steps", 1,
                "--device", "cpu", *same, "model.ch=64", *TRAIN, *start, check=False)  # fmt: skip
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "encoder.conv_in.weight is (32, 3, 3, 3) there but (64, 3, 3, 3) here" in bad.stderr
    r = rqgen("train-vae", "--data", "bundled:digits", "--out", tmp_path / "no2", "--steps", 1,
              "--device", "cpu", *TRAIN, "train.freeze_codebook=true", check=False)  # fmt: skip
    assert r.returncode != 0 and "give train.init_from" in r.stderr


def test_a_new_number_of_classes_reinitialises_only_the_class_rows():
    def make(classes: int, seed: int) -> RQTransformer:
        torch.manual_seed(seed)
        config = RQTransformerConfig(codebook_size=16, code_shape=[2, 2, 2], embed_dim=8,
                                     width=16, heads=2, spatial_layers=1, depth_layers=1,
                                     num_classes=classes)  # fmt: skip
        return RQTransformer(config, torch.randn(1, 16, 8))

    source = make(10, 0)
    for classes in (3, 0):  # another class count; model.conditioning=none
        model = make(classes, 1)
        fresh = model.state_dict()["cond_emb.weight"].clone()
        start_from(model, source, "src", adapt=True)
        got = model.state_dict()
        assert torch.equal(got["cond_emb.weight"][:-1], fresh[:-1])  # new class rows
        assert torch.equal(got["cond_emb.weight"][-1], source.cond_emb.weight[-1])  # null row
        assert torch.equal(got["codebook"], make(classes, 1).codebook)  # the current VAE's
        for k, v in source.state_dict().items():
            if k not in ("cond_emb.weight", "codebook"):
                assert torch.equal(got[k], v), k


def test_stage2_fine_tunes_a_class_model_into_an_unconditional_one(vae, class_ar, tmp_path):
    out = tmp_path / "uncond"
    r = train_ar(vae, out, 2, "model.conditioning=none", f"train.init_from={class_ar}")
    assert "starting from the weights of" in r.stdout
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert pipe.conditioning == "none" and len(pipe(num_images=2, seed=0).images) == 2
    json.loads((out / "config.json").read_text())  # a public model was written
    bad = train_ar(vae, tmp_path / "bad", 1, f"train.init_from={vae}", check=False)
    assert bad.returncode != 0 and "holds a 'rqvae' model" in bad.stderr
