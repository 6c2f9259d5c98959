"""The models shipped in the package: a first sample with no training, loaded like any
model (benchmarks/bundled_models.py trains them and records their scores)."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_vae import rqgen

from rqgen import RQPipeline
from rqgen.errors import CheckpointError
from rqgen.evaluate.digits import load_or_train


def test_bundled_digits_sample_sevens_from_the_cli_and_python(tmp_path, rqgen_cache):
    rqgen("sample", "--model", "bundled:digits", "--class", 7, "--n", 16, "--device", "cpu",
          "--out", tmp_path / "s.png", "--save-codes", tmp_path / "c.npy")  # fmt: skip
    assert Image.open(tmp_path / "s.png").size[0] > 0 and np.load(tmp_path / "c.npy").shape[0] == 16
    pipe = RQPipeline.from_pretrained("bundled:digits", device="cpu")
    out = pipe(class_labels=[7], num_images_per_prompt=16, top_k=64, seed=0, output_type="pt")
    classifier = load_or_train(rqgen_cache["RQGEN_CACHE"] + "/classifiers")
    sevens = float((classifier(out.pixels).argmax(1) == 7).float().mean())
    assert sevens >= 0.75, sevens  # they look like sevens to a classifier of real digits
    with pytest.raises(CheckpointError, match=r"bundled:nope is not a model shipped .*digits"):
        RQPipeline.from_pretrained("bundled:nope")
    torch.testing.assert_close(pipe.model.codebook, pipe.vae.quantizer.codebook)


def test_eval_gen_of_a_shipped_model_needs_an_out_folder(tmp_path, rqgen_cache):
    args = ["eval-gen", "--model", "bundled:digits", "--n", 4, "--ref", "bundled:digits:val",
            "--features", "digits", "--device", "cpu"]  # fmt: skip
    r = rqgen(*args, check=False, env_extra=rqgen_cache)
    assert r.returncode != 0 and "give --out DIR" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bundled_photo_tokenizer_reconstructs_held_out_photos_as_recorded():
    import json

    from rqgen.data import build_dataset
    from rqgen.evaluate.recon import psnr
    from rqgen.hub import bundled
    from rqgen.stage1 import load_vae

    vae = load_vae("bundled:photos-vae").eval()
    recorded = json.loads((bundled("bundled:photos-vae") / "evaluations.json").read_text())
    val = build_dataset("bundled:photos:val", 32, split="val")
    x = torch.stack([val[i][0] for i in range(0, len(val), 4)])  # 64 of the 256 fixed crops
    with torch.no_grad():
        xr = vae.decode_codes(vae.encode_to_codes(x)).clamp(-1, 1)
    ours = float(psnr(xr, x).mean())
    assert abs(ours - recorded["eval-vae on bundled:photos:val"]["psnr"]) < 1.0, ours
